"""Where each input's output goes, checked before any work, and when an output counts as done.

`-o OUT` names the output of a single input, else `<folder>/<tomogram name><suffix>`.
An output is *complete* when it and its provenance sidecar `<output>.json` exist
(both are written atomically), which is what lets a rerun resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import check_output_dir
from vpdetect.io.mrc import tomogram_name

FORMAT_SUFFIX = {
    "relion4": ".star", "relion5": ".star", "csv": ".csv", "shrec": ".txt", "dynamo": ".tbl", "imod": ".mod",
}


def sidecar_path(output: Path) -> Path:
    """Where an output's provenance record lives: `<output>.json`."""
    return output.with_name(output.name + ".json")


def is_complete(output: Path) -> bool:
    """An output counts as done when it and its sidecar both exist (outputs are written atomically)."""
    return output.is_file() and sidecar_path(output).is_file()


def plan_outputs(
    inputs: Sequence[Path],
    output: Path | None,
    output_dir: Path | None,
    suffix: str,
    *,
    naming: Callable[[Path], str] | None = None,
    beside_inputs: bool = False,
) -> list[Path]:
    """One output path per input: `output` for a single input, else `<folder>/<name>`.

    The name is `naming(input)`, by default the tomogram's name plus `suffix`;
    the folder is `output_dir`, else each input's own folder (`beside_inputs`)
    or the current one. No output may overwrite an input or another output.
    """
    if output is not None:
        if len(inputs) != 1:
            raise VPDetectError(f"-o/--output names one file but {len(inputs)} inputs were given; use --output-dir")
        if output_dir is not None:
            raise VPDetectError("give either -o/--output or --output-dir, not both")
        outputs = [Path(output)]
    else:
        if output_dir is not None:
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                check_output_dir(output_dir)  # says why in one line
                raise
        name_of = naming or (lambda path: f"{tomogram_name(path)}{suffix}")
        outputs = [
            (output_dir if output_dir is not None else path.parent if beside_inputs else Path(".")) / name_of(path)
            for path in inputs
        ]
    for folder in dict.fromkeys(out.parent for out in outputs):
        check_output_dir(folder)  # before any work, not after the first tomogram
    seen: dict[Path, Path] = {}
    sources = {os.path.abspath(path) for path in inputs}
    for path, out in zip(inputs, outputs, strict=True):
        if os.path.abspath(out) in sources:
            raise VPDetectError(f"output {out} would overwrite an input; choose another output name or folder")
        if out in seen:
            raise VPDetectError(f"{seen[out]} and {path} would both write {out}; rename one tomogram")
        seen[out] = path
    return outputs
