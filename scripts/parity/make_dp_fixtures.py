#!/usr/bin/env python3
"""Write the DP-SGD parity fixtures: Opacus's DPOptimizer (and DPPerLayerOptimizer) over
torch.optim.SGD, in f32, with per-sample gradients whose number of samples changes from step
to step.

One file per case, tests/parity/fixtures/<case>.safetensors, in make_fixtures.py's format, with
  input.G.<tname>   [sum of the steps' samples, *shape]: step k's per-sample gradients are the
                    samples[k] blocks after those of the steps before it
and the metadata key
  samples           JSON list: the number of samples of each step
The noise multiplier is 0 (torch's noise bits are not optc's): the fixtures pin the clipping,
the sum over samples, the division by the batch size and the SGD step; tests/sample_axis.rs
checks the noise. Each step's per-sample gradient norms spread from 0.05 to 20 times the
threshold, so some samples are clipped and others are not. Run with the project's venv:

    .venv/bin/python scripts/parity/make_dp_fixtures.py [--out tests/parity/fixtures]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import zlib

import numpy as np
import torch
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import save_stable  # noqa: E402

SHAPES: dict[str, tuple[int, ...]] = {
    "w0": (1,),
    "w1": (5,),
    "w2": (7, 3),
    "w3": (33,),
}
# The number of samples of each step: 1, 7 and 64 among them, changing every step.
SAMPLES = [7, 1, 64, 3, 7, 2, 64, 5, 1, 9, 16, 4, 7, 64, 3, 1, 12, 6, 7, 2, 33, 1, 8, 7]

# case -> (optc hyperparameters, the batch size Opacus divides by: None for the step's samples)
CASES = {
    "dp_sgd_default": ({"lr": 0.1}, None),
    "dp_sgd_momentum_wd": (
        {
            "lr": 0.05,
            "max_grad_norm": 0.7,
            "momentum": 0.9,
            "dampening": 0.1,
            "weight_decay": 0.01,
            "noise_multiplier": 0.0,
            "expected_batch_size": 16,
        },
        16,
    ),
    "dp_sgd_per_layer_nesterov": (
        {
            "lr": 0.2,
            "max_grad_norm": 0.5,
            "per_layer": True,
            "momentum": 0.5,
            "nesterov": True,
            "noise_multiplier": 0.0,
        },
        None,
    ),
}


def make_case(name: str, hyper: dict, batch: int | None) -> tuple[dict, dict]:
    hyper = {"noise_multiplier": 0.0, **hyper}
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    c = hyper.get("max_grad_norm", 1.0)
    grads = {k: [] for k in SHAPES}
    for b in SAMPLES:
        # per-sample scales log-uniform in [0.05 C, 20 C] over the whole gradient's norm
        scale = np.exp(rng.uniform(np.log(0.05), np.log(20.0), size=b)) * c
        raw = {k: rng.standard_normal((b, *s)) for k, s in SHAPES.items()}
        norms = np.sqrt(sum((raw[k].reshape(b, -1) ** 2).sum(axis=1) for k in SHAPES))
        for k, s in SHAPES.items():
            f = (scale / norms).reshape((b,) + (1,) * len(s))
            grads[k].append((raw[k] * f).astype(np.float32))

    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    sgd = torch.optim.SGD(
        list(params.values()),
        lr=hyper["lr"],
        momentum=hyper.get("momentum", 0.0),
        dampening=hyper.get("dampening", 0.0),
        weight_decay=hyper.get("weight_decay", 0.0),
        nesterov=hyper.get("nesterov", False),
        foreach=False,
    )
    common = dict(noise_multiplier=0.0, expected_batch_size=batch or SAMPLES[0], loss_reduction="mean")
    if hyper.get("per_layer"):
        opt = DPPerLayerOptimizer(sgd, max_grad_norm=[c] * len(SHAPES), **common)
        reference = f"opacus DPPerLayerOptimizer(SGD, max_grad_norm=[{c}]*{len(SHAPES)})"
    else:
        opt = DPOptimizer(sgd, max_grad_norm=c, **common)
        reference = f"opacus DPOptimizer(SGD, max_grad_norm={c})"

    expected = {k: np.empty((len(SAMPLES), *s), dtype=np.float32) for k, s in SHAPES.items()}
    for step, b in enumerate(SAMPLES):
        opt.expected_batch_size = batch or b
        for k, p in params.items():
            p.grad_sample = torch.from_numpy(grads[k][step].copy())
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, p in params.items():
            expected[k][step] = p.detach().numpy()

    tensors = {}
    for k in SHAPES:
        tensors[f"param.{k}"] = init[k]
        tensors[f"input.G.{k}"] = np.concatenate(grads[k], axis=0)
        tensors[f"expected.{k}"] = expected[k]
    meta = {
        "rule": "dp_sgd",
        "hyper": json.dumps(hyper, sort_keys=True),
        "steps": str(len(SAMPLES)),
        "samples": json.dumps(SAMPLES),
        "reference": reference + f", SGD{tuple(sorted((k, v) for k, v in hyper.items()))}",
        "torch_version": torch.__version__,
        "opacus_version": importlib.metadata.version("opacus"),
    }
    return tensors, meta


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(root, "tests", "parity", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    for name, (hyper, batch) in CASES.items():
        tensors, meta = make_case(name, hyper, batch)
        save_stable(tensors, os.path.join(args.out, f"{name}.safetensors"), meta)
        print(f"{name:32s} {meta['reference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
