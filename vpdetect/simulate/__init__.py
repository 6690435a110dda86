"""Simulated SHREC-like tomograms with full ground truth (`vpdetect simulate`).

phantoms: the synthetic particle classes and their analytic rendering;
scene: crowded, non-overlapping placement in an ice slab;
microscope: tilt series, CTF, noise and weighted back-projection;
pipeline: parameters, presets and `simulate_tomogram`.
"""

from vpdetect.simulate.pipeline import (  # noqa: F401
    PRESETS,
    SimulationParams,
    SimulationResult,
    preset_params,
    simulate_tomogram,
)
