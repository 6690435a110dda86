"""MSDNet training speed on CPU (issue 12 point 5): crops per second of one training step.

A step is what `vpdetect train` does per batch: forward, cross-entropy against
random labels, backward, Adam update. The same random-weight network (the
bundled localizer's shape by default: w=2, d=20, M=7) on the same random crops,
timed in this run with the same torch thread count, three ways:

- baseline `concat`: autograd through `vpdetect.nn.reference.concat_forward`,
  which concatenates all earlier maps for every layer and runs one dilated
  conv3d per channel;
- `buffer, conv3d`: `MSDNet` (one feature buffer, a backward that keeps only
  the buffer) with its layers as conv3d per channel;
- `buffer, gemm`: the same with each layer as one matrix multiply per crop plus
  shifted adds, the CPU default of `vpdetect train`.

The weight gradients of one step are compared with the baseline's (they must
agree: the three are one network). Options: `--crop N`, `--batch N`, `--depth N`,
`--steps N` (`--help`).
"""

from __future__ import annotations

import statistics
import time

THREADS = 2
SEED = 0
CROP = 40
BATCH = 4
DEPTH = 20
STEPS = 3


def _net(depth: int):
    import torch

    from vpdetect.nn.msdnet import MSDNet

    torch.manual_seed(SEED)
    return MSDNet(1, 2, 2, depth, 7).train()


def _gradients(model, forward, x, y) -> list:
    import torch.nn.functional as F

    model.zero_grad()
    F.cross_entropy(forward(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def step_seconds(model, forward, x, y, steps: int) -> float:
    """Median seconds of `steps` training steps (after one untimed step)."""
    import torch
    import torch.nn.functional as F

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimiser.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        optimiser.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(crop: int = CROP, batch: int = BATCH, depth: int = DEPTH, steps: int = STEPS) -> dict:
    """Crops per second per way and the largest weight-gradient difference from the baseline."""
    import torch

    from vpdetect.nn.reference import concat_logits

    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, 1, crop, crop, crop, generator=generator)
    y = torch.randint(0, 2, (batch, crop, crop, crop), generator=generator)
    ways = {
        "concat": lambda m: (lambda v: concat_logits(m, v)),
        "buffer, conv3d": lambda m: m,
        "buffer, gemm": lambda m: m,
    }
    results, reference = {}, None
    for name, make in ways.items():
        model = _net(depth)
        model.method = {"buffer, conv3d": "conv", "buffer, gemm": "gemm"}.get(name, "auto")
        forward = make(model)
        gradients = _gradients(model, forward, x, y)
        if reference is None:
            reference = gradients
        difference = max(float((a - b).abs().max()) for a, b in zip(gradients, reference, strict=True))
        seconds = step_seconds(model, forward, x, y, steps)
        results[name] = {"seconds": seconds, "crops_per_s": batch / seconds, "gradient_difference": difference}
    return results


def parse_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks training", description=__doc__.split("\n")[0])
    parser.add_argument("--crop", type=int, default=CROP, help=f"Crop edge (default {CROP}).")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"Crops per step (default {BATCH}).")
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"Layers, width 2, dilations 1..7 (default {DEPTH}).")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"Timed steps per way, median (default {STEPS}).")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    """`python -m benchmarks training [--crop N] [--batch N] [--depth N] [--steps N]`."""
    import torch

    args = parse_args(list(argv or []))
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        print(f"settings: {THREADS} torch threads, float32, MSDNet w=2 d={args.depth} M=7,\n"
              f"  {args.batch} random crops of {args.crop}^3 per step, random labels, Adam;\n"
              f"  median of {args.steps} steps after one")
        results = compare(args.crop, args.batch, args.depth, args.steps)
        base = results["concat"]["seconds"]
        print("| way | s per step | crops/s | vs concat | weight-gradient difference |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['seconds']:.2f} | {r['crops_per_s']:.2f} | {base / r['seconds']:.1f}x | "
                  f"{r['gradient_difference']:.1e} |", flush=True)
    finally:
        torch.set_num_threads(previous)
