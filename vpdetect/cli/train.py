"""`vpdetect train`: train a localizer or classifier on annotated tomograms.

The localizer is an MSDNet; the classifier is an MSDNet (`--arch msdnet`,
segment-and-vote) or one of the whole-box classifiers of `vpdetect.nn.classifiers`
(`--arch dilated-densenet|densenet|dsrf3d-v2|rb3d|cb3d`), trained on boxes
around the true coordinates plus non-particle boxes.

Writes, beside `--out MODEL.pt` (the best model by validation MIoU, or macro F1 for box classifiers):
`MODEL.last.pt` (the latest epoch plus optimizer state, for `--resume`),
`MODEL.log.csv` (one row per epoch) and `MODEL.curves.png`. Under
`torchrun --nproc-per-node N` every process trains on its shard of the crops
(DistributedDataParallel); only rank 0 reports and writes files.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.copick_options import (
    copick_option,
    copick_training_sources,
    run_option,
    tomo_type_option,
    truth_user_option,
    voxel_spacing_option,
)
from vpdetect.cli.geometry import load_tomograms, tomograms_star_option
from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import check_output_dir

STAGES = ("localizer", "classifier")
# Paper defaults per stage: localizer w=2, d=49, dilations 1..7; classifier d=100, 1..5.
STAGE_DEFAULTS = {
    "localizer": {"depth": 49, "max_dilation": 7, "gamma": 0.0, "alpha": "none", "particle_share": 0.5},
    "classifier": {"depth": 100, "max_dilation": 5, "gamma": 2.0, "alpha": "radius", "particle_share": 0.8},
}
# Whole-box classifiers: class-balanced sampling replaces class weights; the paper's 32^3 boxes
# (Dilated-DenseNet on SHREC'19).
BOX_DEFAULTS = {"gamma": 0.0, "alpha": "none", "crop_size": 32}
MSDNET_CROP_SIZE = 64
# Localizers: sigma (voxels) of the smooth background subtracted from their input. Twice the
# largest particle radius (about 8 voxels at 1 nm): particles keep their contrast, gradients go.
LOCALIZER_BACKGROUND_SIGMA = 8.0


def side_paths(out: Path) -> dict[str, Path]:
    """Files written beside the model: last checkpoint, CSV log, PNG curves."""
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "last": out.with_name(f"{stem}.last.pt"),
        "csv": out.with_name(f"{stem}.log.csv"),
        "png": out.with_name(f"{stem}.curves.png"),
    }


def _load_sources(folders, tomograms, tables, radius, radius_unit, pixel_size, what: str, tomo_set=None):
    from vpdetect.cli.options import parse_class_values
    from vpdetect.train.data import load_coordinate_volume, load_shrec_folder

    sources = [load_shrec_folder(folder, voxel_size=pixel_size) for folder in folders]
    if len(tomograms) != len(tables):
        raise VPDetectError(
            f"{what}: give one --{'val-' if what == 'validation' else ''}table per "
            f"--{'val-' if what == 'validation' else ''}tomogram ({len(tomograms)} tomograms, {len(tables)} tables)"
        )
    if tomograms:
        default_r, per_class = parse_class_values(radius, "--radius")
        if default_r is None and not per_class:
            raise VPDetectError("coordinate-only data needs --radius (R, or CLASS=R per class)")
        for tomo, table in zip(tomograms, tables, strict=True):
            sources.append(
                load_coordinate_volume(tomo, table, default_r, per_class, radius_unit, pixel_size, tomo_set)
            )
    return sources


def _leaves_process_group(func):
    """Leave a torchrun process group however the command ends: an error (bad data, a
    diverged loss, which every rank sees together) must not skip `destroy_process_group`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from vpdetect.train.loop import current_dist_info, shutdown_distributed

        finished = False
        try:
            result = func(*args, **kwargs)
            finished = True
            return result
        finally:
            shutdown_distributed(current_dist_info(), finished)

    return wrapper


@app.command()
@user_errors
@_leaves_process_group
def train(
    stage: str = typer.Argument(..., help="Which network to train: localizer or classifier."),
    data: list[Path] = typer.Option(
        [], "--data", "-d", help="SHREC-layout training folder (reconstruction.mrc + masks); repeatable."
    ),
    val: list[Path] = typer.Option([], "--val", help="SHREC-layout validation folder; repeatable."),
    tomogram: list[Path] = typer.Option(
        [], "--tomogram", help="Training tomogram with coordinates in the matching --table; repeatable."
    ),
    table: list[Path] = typer.Option(
        [], "--table", help="STAR/CSV/SHREC particle table for the --tomogram at the same position."
    ),
    val_tomogram: list[Path] = typer.Option([], "--val-tomogram", help="Validation tomogram (with --val-table)."),
    val_table: list[Path] = typer.Option([], "--val-table", help="Particle table for the --val-tomogram."),
    radius: list[str] = typer.Option(
        [], "--radius", help="Target sphere radius for coordinate data: R for all classes or CLASS=R; repeatable."
    ),
    radius_unit: str = typer.Option("angstrom", "--radius-unit", help="Unit of --radius: angstrom or voxel."),
    pixel_size: float = typer.Option(
        None, "--pixel-size", min=0.0, help="Voxel size in Angstrom, overriding the MRC headers."
    ),
    tomograms_star: Path = tomograms_star_option(),
    copick: Path = copick_option(),
    run: list[str] = run_option(),
    val_run: list[str] = typer.Option([], "--val-run", help="copick run held out for validation (repeatable)."),
    voxel_spacing: float = voxel_spacing_option(),
    tomo_type: str = tomo_type_option(),
    truth_user: str = truth_user_option(),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Model file to write (the best epoch by validation MIoU, or macro F1 for boxes)."
    ),
    arch: str = typer.Option(
        "msdnet", "--arch",
        help="Classifier network: msdnet (segment and vote), dilated-densenet, densenet, dsrf3d-v2, rb3d "
        "or cb3d (one label per box). The localizer is always an MSDNet.",
    ),
    width_divisor: int = typer.Option(
        1, "--width-divisor", min=1, help="Box classifiers: divide every channel width by this (1 = the paper's)."
    ),
    max_shift: int = typer.Option(
        2, "--max-shift", min=0, help="Box classifiers: particle boxes are shifted up to this many voxels per axis."
    ),
    background_share: float = typer.Option(
        0.1, "--background-share", min=0.0, max=0.95,
        help="Box classifiers: share of non-particle boxes (background, vesicles), the rest class-balanced.",
    ),
    gain_jitter: float = typer.Option(
        0.3, "--gain-jitter", min=0.0, max=0.95,
        help="Box classifiers: multiply each training box by a random gain in [1/(1+J), 1+J], so that "
        "the class is read from shape rather than from contrast, which differs between tomograms.",
    ),
    background_sigma: float = typer.Option(
        None, "--background-sigma", min=0.0,
        help=f"Localizers: subtract a smooth background (a Gaussian of this sigma, voxels) from every tomogram, "
        f"in training and, recorded in the model, at inference: ice and density gradients no longer hide "
        f"particles. 0 turns it off (default {LOCALIZER_BACKGROUND_SIGMA:g} for localizers).",
    ),
    match_spectrum: bool = typer.Option(
        False, "--match-spectrum/--no-match-spectrum",
        help="Localizers: filter every training tomogram (after the background subtraction) towards the "
        "training set's mean radial amplitude spectrum, as `localize --match-spectrum` filters a user's "
        "tomogram; the model then matches by default, so that it sees at inference what it saw in training.",
    ),
    remove_gold_streaks: bool = typer.Option(
        False, "--remove-gold-streaks/--keep-gold-streaks",
        help="Localizers: subtract gold beads' streaks from every training tomogram as `localize` subtracts "
        "a user's (after the background, before the spectrum); recorded in the model, which then "
        "subtracts them by default.",
    ),
    erase_membranes: bool = typer.Option(
        False, "--erase-membranes/--keep-membranes",
        help="Localizers: replace membranes by noise in every training tomogram as `localize` erases a "
        "user's (last, labels kept); recorded in the model, which then erases them by default.",
    ),
    classes: str = typer.Option(
        None, "--classes", help="Comma-separated classes to train (others become background); default all."
    ),
    merge: list[str] = typer.Option(
        [], "--merge", help="NEW=OLD1,OLD2: train the old classes as one class NEW; repeatable."
    ),
    exclude: str = typer.Option(
        "vesicle", "--exclude", help="Comma-separated classes treated as background ('' for none)."
    ),
    width: int = typer.Option(2, "--width", min=1, help="MSDNet channels per layer."),
    depth: int = typer.Option(None, "--depth", min=1, help="MSDNet layers (default 49 localizer, 100 classifier)."),
    max_dilation: int = typer.Option(
        None, "--max-dilation", min=1, help="Largest dilation; layers cycle 1..M (default 7 localizer, 5 classifier)."
    ),
    crop_size: int = typer.Option(
        None, "--crop-size", min=4,
        help="Edge of the cubic training crops (MSDNet, default 64) or boxes (box classifiers, default 32) in voxels.",
    ),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Crops per step (per process under torchrun)."),
    epochs: int = typer.Option(500, "--epochs", min=1, help="Epochs to train (paper: 500)."),
    steps_per_epoch: int = typer.Option(100, "--steps-per-epoch", min=1, help="Optimizer steps per epoch."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Initial Adam learning rate (paper: 1e-3)."),
    lr_step: int = typer.Option(80, "--lr-step", min=1, help="Epochs between learning-rate drops (paper: 80)."),
    lr_factor: float = typer.Option(0.1, "--lr-factor", min=0.0, help="Learning-rate multiplier at each drop."),
    gamma: float = typer.Option(
        None, "--gamma", min=0.0, help="Focal-loss focusing parameter (default 0 localizer, 2 classifier)."
    ),
    alpha: str = typer.Option(
        None, "--alpha",
        help="Class weights: none, radius (smaller particles weigh more), frequency, or a comma list "
        "(background first). Default none (localizer), radius (classifier).",
    ),
    particle_share: float = typer.Option(
        None, "--particle-share", min=0.0, max=1.0,
        help="Share of crops centred near a particle (default 0.5 localizer, 0.8 classifier).",
    ),
    size_balance: float = typer.Option(
        0.0, "--size-balance", min=0.0,
        help="Particle-centred crops choose particles with weight radius^-P (0: every particle alike). "
        "A localizer learns all sizes as one class, where a small particle holds few voxels and weighs "
        "little in the loss; 1-3 centre more crops on small particles.",
    ),
    structure_share: float = typer.Option(
        0.0, "--structure-share", min=0.0, max=1.0,
        help="Share of crops centred on strong structure that is not a particle (gold, membranes, "
        "carbon, slab surfaces; found by band-passed energy far above the noise), which uniformly "
        "placed crops rarely hold. Taken from the randomly placed share (at most 1 - --particle-share).",
    ),
    val_crops: int = typer.Option(
        16, "--val-crops", min=0,
        help="Validation crops per epoch (fixed); box classifiers validate on every validation particle.",
    ),
    seed: int = typer.Option(
        0, "--seed",
        help="Random seed: same data, options and seed give the same model (on a GPU with --deterministic).",
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="Mixed precision on CUDA (bfloat16, or float16)."),
    deterministic: bool = typer.Option(
        False, "--deterministic",
        help="Deterministic GPU kernels only, so a GPU run repeats exactly (slower; the CPU always repeats).",
    ),
    workers: int = typer.Option(0, "--workers", min=0, help="Data-loader worker processes."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's choice)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in MODEL.last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over even if this run's files exist."),
    time_limit: float = typer.Option(
        None, "--time-limit", min=0.0, help="Stop after this many minutes (finished epochs are kept; --resume later)."
    ),
    normalisation: str = typer.Option(
        None, "--normalisation",
        help="Input normalisation, recorded in the model: robust (median/MAD, clipped; default for localizers) "
        "or zscore (mean/std; default for classifiers).",
    ),
    contrast: str = typer.Option(
        "auto", "--contrast",
        help="Contrast of the training tomograms without a simulation record: dark (dense matter dark, as "
        "reconstructed), bright (inverted) or auto (detected per tomogram). Bright ones are negated: "
        "the model expects dark input.",
    ),
    init: Path = typer.Option(
        None, "--init", help="Start from this model's weights: fine-tuning (same architecture), or a "
        "shallower MSDNet of the same width and dilations grown to --depth (same map at the start)."
    ),
) -> None:
    """Train a localizer (particle vs background) or a classifier (one class per particle type)."""
    from vpdetect.nn.checkpoint import ARCHITECTURES

    if stage not in STAGES:
        raise VPDetectError(f"stage must be localizer or classifier, got {stage!r}")
    if arch not in ARCHITECTURES:
        raise VPDetectError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    boxes = arch != "msdnet"
    if boxes and stage != "classifier":
        raise VPDetectError(f"--arch {arch} is a classifier; the localizer is an MSDNet")
    if crop_size is None:
        crop_size = BOX_DEFAULTS["crop_size"] if boxes else MSDNET_CROP_SIZE
    if not data and not tomogram and copick is None:
        raise VPDetectError("no training data: give --data DIR, --tomogram T.mrc --table T.star or --copick")
    if radius_unit not in ("angstrom", "voxel"):
        raise VPDetectError(f"--radius-unit must be angstrom or voxel, got {radius_unit!r}")
    from vpdetect.preprocess import CONTRASTS, MODEL_CONTRAST, NORMALISATIONS
    from vpdetect.spectrum import reference_profile

    normalisation = normalisation or ("robust" if stage == "localizer" else "zscore")
    if normalisation not in NORMALISATIONS:
        raise VPDetectError(f"--normalisation must be {' or '.join(NORMALISATIONS)}, got {normalisation!r}")
    if contrast not in (*CONTRASTS, "auto"):
        raise VPDetectError(f"--contrast must be dark, bright or auto, got {contrast!r}")
    if background_sigma and stage != "localizer":
        raise VPDetectError("--background-sigma applies to localizers only (classifiers read boxes as they are)")
    background_sigma = (LOCALIZER_BACKGROUND_SIGMA if stage == "localizer" else 0.0) if background_sigma is None \
        else float(background_sigma)
    for flag, name in ((match_spectrum, "--match-spectrum"), (remove_gold_streaks, "--remove-gold-streaks"),
                       (erase_membranes, "--erase-membranes")):
        if flag and stage != "localizer":
            raise VPDetectError(f"{name} applies to localizers only")
    if size_balance and boxes:
        raise VPDetectError("--size-balance applies to MSDNet crops; box classifiers sample classes evenly")
    if structure_share and boxes:
        raise VPDetectError("--structure-share applies to MSDNet crops; box classifiers use --background-share")
    if init is not None and resume:
        raise VPDetectError("--init starts a new run; it cannot be combined with --resume")
    paths = side_paths(out)
    check_output_dir(out.parent)
    if resume and not paths["last"].is_file():
        raise VPDetectError(f"cannot resume: {paths['last']} not found")
    if not resume and not overwrite:
        existing = [p for p in (out, paths["last"]) if p.exists()]
        if existing:
            raise VPDetectError(
                f"{existing[0]} exists: pass --resume to continue that run or --overwrite to start over"
            )

    import torch

    from vpdetect import __version__
    from vpdetect.devices import resolve_device
    from vpdetect.nn.checkpoint import load_model, read_training_state, save_model
    from vpdetect.nn.losses import parse_alpha
    from vpdetect.nn.msdnet import MSDNet, grow_depth
    from vpdetect.train.data import (
        CropDataset,
        build_class_mapping,
        class_voxel_counts,
        membranes_erased,
        merged_radii,
        parse_merge,
        prepare_volume,
        spectrum_matched,
        streaks_removed,
    )
    from vpdetect.train.loop import (
        TrainConfig,
        Trainer,
        fit,
        hardware_description,
        init_distributed,
    )

    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        # cuBLAS reads this once, when it starts: before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist_info = init_distributed(device)
    torch_device = torch.device(dist_info.device or resolve_device(device))
    main_process = dist_info.is_main
    defaults = STAGE_DEFAULTS[stage] | (BOX_DEFAULTS if boxes else {})

    def say(message: str) -> None:
        if main_process:
            console.print(message, highlight=False)

    tomo_set = load_tomograms(tomograms_star)
    sources = _load_sources(data, tomogram, table, radius, radius_unit, pixel_size, "training", tomo_set)
    val_sources = _load_sources(
        val, val_tomogram, val_table, radius, radius_unit, pixel_size, "validation", tomo_set
    )
    copick_train, copick_val = copick_training_sources(
        copick, run, val_run, voxel_spacing, tomo_type, truth_user, radius, radius_unit
    )
    sources, val_sources = sources + copick_train, val_sources + copick_val
    names_seen = [n for av in sources + val_sources for n in list(av.id_names.values()) + av.centre_names]
    select = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    excluded = [e.strip() for e in exclude.split(",") if e.strip()]
    mapping = build_class_mapping(names_seen, stage, select, parse_merge(merge), excluded)
    volumes = [prepare_volume(av, mapping, normalisation, contrast, MODEL_CONTRAST, background_sigma)
               for av in sources]
    val_volumes = [prepare_volume(av, mapping, normalisation, contrast, MODEL_CONTRAST, background_sigma)
                   for av in val_sources]
    flipped = [tv.name for tv in volumes + val_volumes if tv.contrast != MODEL_CONTRAST]
    if flipped:
        say(f"{len(flipped)} tomogram(s) with bright contrast negated for training: {', '.join(flipped[:8])}"
            + (" ..." if len(flipped) > 8 else ""))

    # In `localize`'s order: background, streaks, spectrum, normalisation, membranes.
    if remove_gold_streaks:
        before = volumes + val_volumes
        volumes = [streaks_removed(tv, normalisation) for tv in volumes]
        val_volumes = [streaks_removed(tv, normalisation) for tv in val_volumes]
        with_beads = sum(new is not old for new, old in zip(volumes + val_volumes, before, strict=True))
        say(f"gold streaks subtracted in {with_beads} of {len(before)} tomogram(s) (the others have no bead)")
    # What `--match-spectrum` filters a user's tomogram towards (vpdetect.spectrum).
    # Measured as the model sees its tomograms (after any background subtraction), where
    # `localize` matches a user's.
    spectrum = None if stage != "localizer" else reference_profile([tv.volume for tv in volumes])
    if match_spectrum:
        volumes = [spectrum_matched(tv, spectrum, normalisation) for tv in volumes]
        val_volumes = [spectrum_matched(tv, spectrum, normalisation) for tv in val_volumes]
        say(f"{len(volumes) + len(val_volumes)} tomogram(s) filtered towards the training set's amplitude spectrum")
    if erase_membranes:
        volumes = [membranes_erased(tv) for tv in volumes]
        val_volumes = [membranes_erased(tv) for tv in val_volumes]
        say(f"{len(volumes) + len(val_volumes)} tomogram(s) with their membranes erased")
    alpha_spec = alpha if alpha is not None else defaults["alpha"]
    radii = merged_radii(sources, mapping)
    if alpha is None and alpha_spec == "radius" and any(c not in radii for c in mapping.class_names[1:]):
        alpha_spec = "frequency"
        say("[yellow]warning:[/] effective radii unknown for some classes; class weights from voxel frequency")
    counts = class_voxel_counts(volumes, len(mapping.class_names)) if alpha_spec.strip() == "frequency" else None
    alpha_values = parse_alpha(alpha_spec, mapping.class_names, radii, counts)

    config = TrainConfig(
        stage=stage,
        width=width,
        depth=depth or defaults["depth"],
        max_dilation=max_dilation or defaults["max_dilation"],
        crop_size=crop_size,
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        lr_step=lr_step,
        lr_factor=lr_factor,
        gamma=defaults["gamma"] if gamma is None else gamma,
        alpha=alpha_values,
        seed=seed,
        particle_share=defaults["particle_share"] if particle_share is None else particle_share,
        size_balance=size_balance,
        structure_share=structure_share,
        val_crops=val_crops,
        workers=workers,
        amp=amp,
        deterministic=deterministic,
        class_names=mapping.class_names,
        arch=arch,
        width_divisor=width_divisor,
        max_shift=max_shift,
        background_share=background_share,
        gain_jitter=gain_jitter if boxes else 0.0,  # MSDNet crops are not jittered
        background_sigma=background_sigma,
    )
    if not val_volumes:
        # A separate stream of crops from the training tomograms: a sanity check, not a held-out score.
        say("[yellow]warning:[/] no --val data: validation crops come from the training tomograms")
    if boxes:
        from vpdetect.train.boxes import BoxDataset

        train_set = BoxDataset(volumes, crop_size, seed, max_shift, background_share, augment=True, stream=0,
                               gain_jitter=gain_jitter)
        # Validation: every particle of the validation tomograms plus non-particle boxes in the training share.
        checked = val_volumes or volumes
        n_val_particles = sum(len(tv.centre_classes) for tv in checked)
        n_background = round(n_val_particles * background_share / (1.0 - background_share))
        val_set = BoxDataset(checked, crop_size, seed, max_shift, background_share, augment=False, stream=1,
                             exhaustive=True, n_background=n_background)
        config.val_crops = len(val_set)
    else:
        train_set = CropDataset(volumes, crop_size, seed, config.particle_share, augment=True, stream=0,
                                size_balance=size_balance, structure_share=structure_share)
        val_set = CropDataset(val_volumes or volumes, crop_size, seed, config.particle_share, augment=False, stream=1)

    trainer = Trainer(config, train_set, val_set, torch_device, dist_info)
    if init is not None:
        start_model, start_card = load_model(init, stage=stage)
        if getattr(start_model, "verifier", None) is not None:
            del start_model.verifier  # it reads the old network's map: `vpdetect train-verifier` the new one
            say(f"{init}'s pick verifier is not carried over (it reads that network's map; train-verifier the new one)")
        if start_model.arch() == trainer.model.arch():
            trainer.model.load_state_dict(start_model.state_dict())
            say(f"starting from the weights of {init}")
        elif isinstance(start_model, MSDNet) and isinstance(trainer.model, MSDNet):
            try:
                grow_depth(trainer.model, start_model)
            except ValueError as err:
                raise VPDetectError(f"--init model {init}: {err}") from None
            say(f"starting from the weights of {init}, depth {start_model.depth} grown to {trainer.model.depth} "
                "(the new layers start unused)")
        else:
            raise VPDetectError(
                f"--init model {init} has architecture {start_model.arch()}, this run {trainer.model.arch()}"
            )
    if resume:
        model, _ = load_model(paths["last"], stage=stage)
        state = read_training_state(paths["last"])
        if not state:
            raise VPDetectError(f"{paths['last']} holds no training state to resume from")
        trainer.load_training_state(state, model.state_dict())
        if trainer.epoch >= epochs:
            raise VPDetectError(f"cannot resume: {trainer.epoch} of {epochs} epochs are already done")

    voxel_sizes = [tv.voxel_size for tv in volumes if tv.voxel_size is not None]
    if voxel_sizes and max(voxel_sizes) > 1.01 * min(voxel_sizes):
        say(f"[yellow]warning:[/] training tomograms have different voxel sizes: {sorted(set(voxel_sizes))}")
    hardware = hardware_description(torch_device, dist_info.world)
    data_names = [str(p) for p in data] + [str(p) for p in tomogram]
    n_params = sum(p.numel() for p in trainer.model.parameters())

    def card(metrics: dict) -> dict:
        wall = sum(r.get("seconds", 0.0) for r in trainer.history)
        return {
            "stage": stage,
            "class_names": mapping.class_names,
            "normalisation": normalisation,
            **({"background_sigma": background_sigma} if background_sigma else {}),
            **({"spectrum_reference": spectrum} if spectrum else {}),
            **({"match_spectrum": True} if match_spectrum else {}),
            **({"remove_gold_streaks": True} if remove_gold_streaks else {}),
            **({"erase_membranes": True} if erase_membranes else {}),
            "contrast": MODEL_CONTRAST,
            "voxel_size": voxel_sizes[0] if voxel_sizes else None,
            "crop_size": crop_size,
            **({} if boxes else {"halo": trainer.model.halo}),
            "n_parameters": n_params,
            "provenance": {
                "arch": arch,
                **({"max_shift": max_shift, "background_share": background_share,
                    "sampling": "class-balanced",
                    "augmentation": "flips of z, y, x"
                    + (f", gain in [1/{1 + gain_jitter:g}, {1 + gain_jitter:g}]" if gain_jitter else "")}
                   if boxes else {}),
                **({"size_balance": size_balance} if size_balance else {}),
                **({"structure_share": structure_share} if structure_share else {}),
                **({"spectrum_matched": True} if match_spectrum else {}),
                **({"gold_streaks_removed": True} if remove_gold_streaks else {}),
                **({"membranes_erased": True} if erase_membranes else {}),
                "data": data_names,
                "init": str(init) if init is not None else None,
                "validation": [str(p) for p in val] + [str(p) for p in val_tomogram],
                "seed": seed,
                "deterministic": deterministic,
                "epochs": trainer.epoch,
                "epochs_planned": epochs,
                "steps_per_epoch": steps_per_epoch,
                "batch_size": batch_size * dist_info.world,
                "loss": f"focal gamma={config.gamma:g} alpha={alpha_spec}",
                "alpha": alpha_values,
                "vpdetect_version": __version__,
                "wall_time_s": round(wall, 1),
                "hardware": hardware,
            },
            "metrics": metrics,
        }

    network = (
        f"{arch} box {crop_size}^3" + (f" widths/{width_divisor}" if width_divisor > 1 else "")
        if boxes else f"MSDNet w={config.width} d={config.depth} M={config.max_dilation}"
    )
    say(
        f"training {stage}: {len(volumes)} tomogram(s), classes {', '.join(mapping.class_names)}; "
        f"{network} ({n_params:,} parameters) on {hardware}"
    )
    if resume:
        say(f"resuming after epoch {trainer.epoch} of {epochs}")

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not main_process,
        transient=True,
    )
    task_holder: dict = {}

    def on_epoch_start(epoch: int) -> None:
        task_holder["task"] = progress.add_task(f"epoch {epoch}/{epochs}", total=steps_per_epoch, loss="-")

    def on_step(step: int, mean_loss: float) -> None:
        progress.update(task_holder["task"], completed=step, loss=f"{mean_loss:.4g}")

    def on_epoch_end(record: dict, improved: bool) -> None:
        progress.remove_task(task_holder["task"])
        metrics = " ".join(
            f"{k} {record[k]:.4f}" for k in ("val_loss", "VA", "MVA", "MIoU", "accuracy", "macro_F1") if k in record
        )
        if "class_F1" in record:
            metrics += "  F1 " + " ".join("-" if v is None else f"{v:.2f}" for v in record["class_F1"])
        say(
            f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4g}  {metrics}  "
            f"{record['seconds']:.1f} s{'  [green]best[/]' if improved else ''}"
        )
        if not main_process:
            return
        if improved:
            save_model(out, trainer.model, card(dict(record)))
        save_model(paths["last"], trainer.model, card(dict(record)), trainer.training_state())
        _write_log_and_curves(trainer.history, paths, f"{stage} {out.name}")

    started = time.monotonic()
    with progress:
        status = fit(trainer, on_epoch_start, on_step, on_epoch_end, time_limit * 60 if time_limit else None)
    if main_process:
        elapsed = time.monotonic() - started
        if trainer.best is None:
            say(f"stopped by the time limit before the first epoch finished ({elapsed:.0f} s); nothing saved")
        else:
            best = trainer.best
            best_text = next(
                (f"{k} {best[k]:.4f}" for k in ("macro_F1", "MIoU") if k in best), f"loss {best['train_loss']:.4g}"
            )
            say(
                f"{'finished' if status == 'done' else 'stopped (time limit)'} after epoch {trainer.epoch}; "
                f"best epoch {best['epoch']} ({best_text}) -> {out}"
            )


def _write_log_and_curves(history: list[dict], paths: dict[str, Path], title: str) -> None:
    from vpdetect.io.atomic import atomic_path, write_text_atomic
    from vpdetect.train.loop import curves_figure, history_csv

    write_text_atomic(paths["csv"], history_csv(history))
    fig = curves_figure(history, title)
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, dpi=100)
