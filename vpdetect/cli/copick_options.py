"""copick on localize and pick: tomograms from a copick project's runs, picks stored back
into it (one picks file per run and class, under a user and session id)."""

from __future__ import annotations

import functools

import typer

from vpdetect.errors import VPDetectError


def copick_option():
    return typer.Option(
        None, "--copick", help="copick project configuration (JSON): take the tomograms from its runs."
    )


def run_option():
    return typer.Option([], "--run", help="copick run to pick (repeatable; default: every run).")


def voxel_spacing_option():
    return typer.Option(None, "--voxel-spacing", help="copick voxel spacing (Angstrom) of the tomograms.")


def tomo_type_option():
    return typer.Option("denoised", "--tomo-type", help="copick tomogram type (e.g. denoised, wbp).")


def copick_user_option():
    return typer.Option(
        None, "--copick-user", help="With --copick: store the picks in the project under this user id."
    )


def copick_session_option():
    return typer.Option("0", "--copick-session", help="copick session id of the stored picks.")


def copick_inputs(tomograms, config, runs, voxel_spacing, tomo_type) -> list[str]:
    """The inputs: the TOMOGRAMS given, or the OME-Zarr tomograms of the copick runs."""
    if config is None:
        if runs or voxel_spacing is not None:
            raise VPDetectError("--run and --voxel-spacing need --copick")
        if not tomograms:
            raise VPDetectError("give tomograms, or a copick project with --copick")
        return list(tomograms)
    if tomograms:
        raise VPDetectError("give tomograms or --copick, not both")
    if voxel_spacing is None:
        raise VPDetectError("--copick needs --voxel-spacing (the tomograms' voxel spacing in Angstrom)")
    from vpdetect.io.particles.copick_picks import copick_tomograms, open_copick

    return [str(p) for p in copick_tomograms(open_copick(config), list(runs) or None, voxel_spacing, tomo_type)]


def store_in_copick(table, config, user, session) -> None:
    """Store one tomogram's picks in the copick project (nothing unless a user id is given)."""
    if config is None or user is None:
        return
    from vpdetect.io.particles.copick_picks import open_copick, write_copick_picks

    write_copick_picks(open_copick(config), table, user, session)


def truth_user_option():
    return typer.Option(
        None, "--truth-user", help="copick ground truth: only the picks of this user id (default: every user's)."
    )


def copick_training_sources(config, runs, val_runs, voxel_spacing, tomo_type, user, radius, radius_unit):
    """(training, validation) AnnotatedVolumes of a copick project: --run (default: every run
    not in --val-run) and --val-run."""
    if config is None:
        if runs or val_runs:
            raise VPDetectError("--run and --val-run need --copick")
        return [], []
    if voxel_spacing is None:
        raise VPDetectError("--copick needs --voxel-spacing (the tomograms' voxel spacing in Angstrom)")
    from vpdetect.cli.options import parse_class_values
    from vpdetect.io.particles.copick_picks import open_copick
    from vpdetect.train.data import load_copick_volumes

    default_r, per_class = parse_class_values(radius, "--radius")
    if not runs:
        runs = [r.name for r in open_copick(config).runs if r.name not in set(val_runs)]
    load = functools.partial(
        load_copick_volumes, config, voxel_spacing=voxel_spacing, tomo_type=tomo_type, user_id=user,
        radius_default=default_r, radius_per_class=per_class, radius_unit=radius_unit,
    )
    return load(list(runs)), (load(list(val_runs)) if val_runs else [])
