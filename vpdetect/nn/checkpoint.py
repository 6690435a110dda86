"""Self-describing model files: weights plus a card that says what they are.

A file is a plain dict that `torch.load(..., weights_only=True)` reads safely:

    {"format": "vpdetect-model", "format_version": 1,
     "card": {...plain Python types...},
     "state_dict": {name: tensor},
     "training_state": {...} or absent}     # optimizer/scheduler/RNG, for --resume

The card (see docs/ARCHITECTURE.md) carries stage, architecture, class names
(index 0 = "background"), normalisation, voxel size, crop size, provenance and
metrics, so loading needs no other file and a model for the wrong stage is
refused by name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import atomic_path

FORMAT = "vpdetect-model"
FORMAT_VERSION = 1
STAGES = ("localizer", "classifier")
ARCH_KEYS = ("in_channels", "n_classes", "width", "depth", "max_dilation")
# Whole-box classifiers (vpdetect.nn.classifiers), named in the card's arch; no name means MSDNet.
BOX_ARCHITECTURES = ("dilated-densenet", "densenet", "dsrf3d-v2", "rb3d", "cb3d")
ARCHITECTURES = ("msdnet", *BOX_ARCHITECTURES)
BOX_ARCH_KEYS = ("in_channels", "n_classes", "box_size", "width_divisor")


def is_box_arch(arch: dict | None) -> bool:
    """Whether a card's arch describes a whole-box classifier (else the segmenting MSDNet)."""
    return isinstance(arch, dict) and arch.get("name", "msdnet") in BOX_ARCHITECTURES


def _plain(value, where: str = "card"):
    """Convert a card to plain Python types (numpy scalars included); refuse anything else."""
    import numpy as np

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where} holds a {type(value).__name__}, which a model card cannot store")


def _check_card(card: dict, source: str) -> None:
    """Raise VPDetectError when a card lacks what loading and inference rely on."""
    if not isinstance(card, dict):
        raise VPDetectError(f"{source}: model card is missing or not a dictionary")
    stage = card.get("stage")
    if stage not in STAGES:
        raise VPDetectError(f"{source}: model card has unknown stage {stage!r}")
    arch = card.get("arch")
    name = arch.get("name", "msdnet") if isinstance(arch, dict) else None
    if name not in ARCHITECTURES:
        raise VPDetectError(f"{source}: model card names an unknown architecture {name!r}")
    if stage == "localizer" and name != "msdnet":
        raise VPDetectError(f"{source}: a localizer must be an MSDNet, the card says {name!r}")
    keys = ARCH_KEYS if name == "msdnet" else BOX_ARCH_KEYS
    if any(not isinstance(arch.get(k), int) or arch.get(k) < 1 for k in keys):
        raise VPDetectError(f"{source}: model card has an incomplete architecture {arch!r}")
    _check_verifier_entry(card, source)
    names = card.get("class_names")
    if not isinstance(names, list) or len(names) != arch["n_classes"] or not names or names[0] != "background":
        raise VPDetectError(
            f"{source}: model card class names {names!r} do not match its "
            f"{arch['n_classes']} output classes with index 0 'background'"
        )


def _check_verifier_entry(card: dict, source: str) -> None:
    """A localizer's optional pick verifier (`vpdetect.nn.verifier`): architecture and minimum score."""
    from vpdetect.nn.verifier import check_verifier_arch

    entry = card.get("verifier")
    if entry is None:
        return
    if card.get("stage") != "localizer" or not isinstance(entry, dict):
        raise VPDetectError(f"{source}: only a localizer's card may hold a pick verifier")
    try:
        check_verifier_arch(entry.get("arch"))
    except ValueError as exc:
        raise VPDetectError(f"{source}: {exc}") from None
    score = entry.get("min_score", 0.0)
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not 0.0 <= score <= 1.0:
        raise VPDetectError(f"{source}: the card's verifier min_score must lie in [0, 1], got {score!r}")


def save_model(path, model, card: dict, training_state: dict | None = None, half_weights: bool = False) -> None:
    """Write `model`'s weights and its card to `path` atomically.

    The card's `format` and `arch` are filled in from the model; `stage` and
    `class_names` must be given. `training_state` (optimizer, scheduler, RNG
    states; tensors and plain types only) is kept for `--resume`.
    `half_weights` stores floating-point tensors as float16 (half the file;
    `load_model` restores float32; the card says `weights_storage: float16`).
    """
    import torch

    full = _plain(dict(card))
    full["format"] = FORMAT
    full["arch"] = _plain(model.arch())
    # The card describes the verifier the weights hold, or none.
    verifier = getattr(model, "verifier", None)
    if verifier is not None:
        full["verifier"] = {**(full.get("verifier") or {}), "arch": _plain(verifier.arch())}
    else:
        full.pop("verifier", None)
    full.setdefault("normalisation", "zscore")
    if half_weights:
        full["weights_storage"] = "float16"
    _check_card(full, str(path))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if half_weights:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "card": full,
        "state_dict": state,
    }
    if training_state is not None:
        payload["training_state"] = training_state
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _read_payload(path, device="cpu") -> dict:
    import pickle

    import torch

    source = Path(path)
    if not source.exists():
        raise VPDetectError(f"model file not found: {source}")
    if source.is_dir():
        raise VPDetectError(f"model path is a directory, not a model file: {source}")
    try:
        payload = torch.load(source, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError):
        # torch's own message is long and talks about weights_only; say what matters.
        raise VPDetectError(
            f"{source} is not a vpdetect model file (corrupted, truncated, or not a "
            "PyTorch file holding only tensors and plain values)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise VPDetectError(f"{source} is not a vpdetect model file (no vpdetect model card)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise VPDetectError(
            f"{source} was written by a newer vpdetect (model format {payload['format_version']})"
        )
    _check_card(payload.get("card"), str(source))
    if not isinstance(payload.get("state_dict"), dict):
        raise VPDetectError(f"{source}: model file holds no weights")
    return payload


def _check_stage(card: dict, stage: str | None, source) -> None:
    if stage is None:
        return
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if card["stage"] != stage:
        raise VPDetectError(
            f"{source} is a {card['stage']} model, but a {stage} model is needed here"
        )


# The command that runs each stage, for messages that say what to pass instead.
STAGE_COMMANDS = {"localizer": "localize", "classifier": "classify"}


def check_inference_card(card: dict, stage: str) -> None:
    """Refuse a card of another stage, or one expecting an input normalisation vpdetect does not apply."""
    from vpdetect.preprocess import CONTRASTS, NORMALISATION, NORMALISATIONS

    found = card.get("stage")
    if found != stage:
        raise VPDetectError(
            f"this is a {found or 'unknown-stage'} model; {STAGE_COMMANDS[stage]} needs a {stage} model"
        )
    normalisation = card.get("normalisation", NORMALISATION)
    if normalisation not in NORMALISATIONS:
        raise VPDetectError(
            f"model expects {normalisation!r} input normalisation; vpdetect applies {' or '.join(NORMALISATIONS)}"
        )
    sigma = card.get("background_sigma", 0.0)
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or sigma < 0:
        raise VPDetectError(f"model card background_sigma must be a non-negative number, got {sigma!r}")
    reference = card.get("spectrum_reference")
    if reference is not None and not (
        isinstance(reference, list) and len(reference) > 1
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in reference)
    ):
        raise VPDetectError("model card spectrum_reference must be a list of non-negative numbers")
    for flag in ("match_spectrum", "erase_membranes", "remove_gold_streaks", "drop_gold"):
        if not isinstance(card.get(flag, False), bool):
            raise VPDetectError(f"model card {flag} must be true or false, got {card[flag]!r}")
    if card.get("contrast", "dark") not in CONTRASTS:
        raise VPDetectError(f"model expects input contrast {card['contrast']!r}; vpdetect knows dark or bright")


def read_model_card(path) -> dict:
    """The card of a model file (validated), without building the network."""
    return _read_payload(path)["card"]


def read_training_state(path) -> dict | None:
    """The optimizer/scheduler/RNG state saved for resuming, or None."""
    return _read_payload(path).get("training_state")


def build_from_arch(arch: dict):
    """The (untrained) network a card's `arch` describes: an MSDNet or a whole-box classifier."""
    from vpdetect.nn.classifiers import build_box_classifier
    from vpdetect.nn.msdnet import MSDNet

    if is_box_arch(arch):
        return build_box_classifier(arch["name"], **{k: arch[k] for k in BOX_ARCH_KEYS})
    return MSDNet(**{k: arch[k] for k in ARCH_KEYS})


def bundle_model(source, destination, card_updates: dict | None = None) -> None:
    """Copy a trained model for shipping: float16 weights, no training state, the card
    updated with `card_updates` (e.g. inference defaults chosen after training)."""
    model, card = load_model(source)
    save_model(destination, model, {**card, **(card_updates or {})}, half_weights=True)


def load_model(path, stage: str | None = None, device="cpu"):
    """(model in eval mode on `device`, card); refuses non-vpdetect files and the wrong stage."""
    payload = _read_payload(path, device="cpu")
    card = payload["card"]
    _check_stage(card, stage, path)
    try:
        model = build_from_arch(card["arch"])
    except ValueError as exc:
        raise VPDetectError(f"{path}: {exc}") from None
    if card.get("verifier"):
        from vpdetect.nn.verifier import build_verifier

        model.verifier = build_verifier(card["verifier"]["arch"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError:
        raise VPDetectError(
            f"{path}: weights do not match the architecture in its model card (corrupted file)"
        ) from None
    return model.to(device).eval(), card


def _fmt_number(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _describe_postprocess(postprocess: dict) -> str:
    """The tuned post-processing in words: fixed bandwidths (voxels) or ones that follow the
    particle radius measured on each map (bandwidth_factor, merge_factor)."""
    parts = [f"threshold {_fmt_number(postprocess.get('threshold', '?'))}"]
    if postprocess.get("bandwidth_factor") is not None:
        parts.append(f"bandwidth {_fmt_number(postprocess['bandwidth_factor'])} x the measured particle radius")
        if postprocess.get("merge_factor") is not None:
            parts.append(f"merge radius {_fmt_number(postprocess['merge_factor'])} x the bandwidth")
    else:
        parts.append(f"bandwidth {_fmt_number(postprocess.get('bandwidth', '?'))} voxels")
        if postprocess.get("merge_radius") is not None:
            parts.append(f"merge radius {_fmt_number(postprocess['merge_radius'])} voxels")
    if postprocess.get("min_size") is not None:
        parts.append(f"min size {_fmt_number(postprocess['min_size'])} voxels")
    if postprocess.get("min_score"):
        parts.append(f"min score {_fmt_number(postprocess['min_score'])}")
    if postprocess.get("max_component"):
        parts.append(f"components over {_fmt_number(postprocess['max_component'])} bandwidth balls dropped")
    if postprocess.get("drop_thin"):
        parts.append("fragments of thin structures dropped")
    if postprocess.get("spare_small"):
        parts.append(f"components up to {_fmt_number(postprocess['spare_small'])} typical particles left unopened")
    text = ", ".join(parts)
    if postprocess.get("f1") is not None:
        text += f" (tuned F1 {postprocess['f1']:.3f})"
    return text


def format_model_card(card: dict) -> str:
    """A readable multi-line summary of a model card (for `vpdetect info MODEL.pt`)."""
    arch = card.get("arch", {})
    if arch.get("name", "msdnet") == "msdnet":
        described = "MSDNet width {width}, depth {depth}, dilations 1..{max_dilation}, ".format(
            **{k: arch.get(k, "?") for k in ARCH_KEYS}
        )
    else:
        divisor = arch.get("width_divisor", 1)
        described = f"{arch['name']} (whole-box classifier), box {arch.get('box_size', '?')}^3, " + (
            "the paper's widths, " if divisor == 1 else f"widths / {divisor}, "
        )
    lines = [
        f"vpdetect {card.get('stage', '?')} model",
        f"  architecture: {described}{arch.get('in_channels', '?')} input channel(s), "
        f"{arch.get('n_classes', '?')} classes",
    ]
    if "n_parameters" in card:
        lines.append(f"  parameters: {card['n_parameters']:,}")
    names = card.get("class_names", [])
    lines.append(f"  classes: {', '.join(f'{i}={n}' for i, n in enumerate(names))}")
    lines.append(f"  normalisation: {card.get('normalisation', '?')}")
    if card.get("background_sigma"):
        lines.append(f"  background subtracted: Gaussian of sigma {card['background_sigma']:g} voxels")
    if card.get("spectrum_reference"):
        use = "matched by default" if card.get("match_spectrum") else "used with --match-spectrum"
        lines.append(f"  spectrum reference: {len(card['spectrum_reference'])} shells ({use})")
    if card.get("erase_membranes"):
        lines.append("  membranes: erased before the network by default (vpdetect.localize.membranes)")
    if card.get("remove_gold_streaks"):
        lines.append("  gold beads' streaks: subtracted before the network by default (vpdetect.localize.fiducials)")
    if card.get("drop_gold"):
        lines.append("  picks on gold beads: dropped by default (--keep-gold keeps them)")
    lines.append(f"  contrast: {card.get('contrast', 'not recorded (tomograms used as given)')}")
    voxel = card.get("voxel_size")
    lines.append(f"  voxel size: {'unknown' if voxel is None else f'{voxel:.3f} A'}")
    if card.get("crop_size") is not None:
        lines.append(f"  crop size: {card['crop_size']}")
    if int(card.get("test_time_flips", 1)) > 1:
        lines.append(f"  test-time flips: {card['test_time_flips']} (predictions averaged over axis flips)")
    if "halo" in card:
        lines.append(f"  receptive-field halo: {card['halo']} voxels")
    verifier = card.get("verifier")
    if verifier:
        arch_v = verifier.get("arch", {})
        lines.append(
            f"  pick verifier: box {arch_v.get('box_size', '?')}^3 of the input and the map, width "
            f"{arch_v.get('width', '?')}; picks scoring under {_fmt_number(verifier.get('min_score', 0.0))} dropped "
            "by default (--no-verify to keep them)"
        )
    postprocess = card.get("postprocess")
    if postprocess:
        lines.append(f"  localize defaults (tuned): {_describe_postprocess(postprocess)}")
    provenance = card.get("provenance") or {}
    if provenance:
        lines.append("  provenance:")
        for key, value in provenance.items():
            if value is None:
                continue
            if isinstance(value, list):
                value = ", ".join(_fmt_number(v) for v in value) if value else "-"
            lines.append(f"    {key}: {_fmt_number(value)}")
    metrics = card.get("metrics") or {}
    if metrics:
        lines.append("  metrics:")
        for key, value in metrics.items():
            lines.append(f"    {key}: {_fmt_number(value)}")
    return "\n".join(lines)
