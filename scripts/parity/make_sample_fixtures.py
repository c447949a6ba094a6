#!/usr/bin/env python3
"""Write the parity fixtures of the rules with a sample axis, in f32, with per-sample gradients
whose number of samples changes from step to step:
- dp_sgd: Opacus's DPOptimizer (and DPPerLayerOptimizer) over torch.optim.SGD;
- adadagrad: the adaptive batch-size tests of timlautk/AdAdaGrad (tests.py's norm_test,
  inner_product_test and inner_product_orthogonality_test, transcribed below in torch: per
  tensor, torch.var with correction 1, summed over tensors) and AdaGrad-Norm's step, the
  tests' statistics and requested batch size stored as `out.<name>` ([steps]).

One file per case, tests/parity/fixtures/<case>.safetensors, in make_fixtures.py's format, with
  input.G.<tname>   [sum of the steps' samples, *shape]: step k's per-sample gradients are the
                    samples[k] blocks after those of the steps before it
and the metadata key
  samples           JSON list: the number of samples of each step
The noise multiplier is 0 (torch's noise bits are not optc's): the fixtures pin the clipping,
the sum over samples, the division by the batch size and the SGD step; tests/sample_axis.rs
checks the noise. Each step's per-sample gradient norms spread from 0.05 to 20 times the
threshold, so some samples are clipped and others are not. Run with the project's venv:

    .venv/bin/python scripts/parity/make_sample_fixtures.py [--out tests/parity/fixtures]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
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


# case -> optc hyperparameters (the tests' statistics are computed for every test_type)
ADADAGRAD_CASES = {
    "adadagrad_default": {},
    "adadagrad_ip_wd": {"lr": 0.05, "b0_sq": 0.5, "weight_decay": 0.01, "test_type": 1, "theta": 0.3},
    "adadagrad_ip_orth": {"lr": 0.02, "test_type": 2, "theta": 0.2, "nu": 0.05, "eta": 0.3},
}


def batch_tests(grads: dict[str, torch.Tensor], eta: float, theta: float, nu: float):
    """The repository's tests on one step's per-sample gradients {tensor: [b, *shape]}: the
    statistics and the batch size each test asks for (the larger of it and b, rounded up)."""
    v_norm = v_ip = v_orth = gsq = 0.0
    b = None
    for g in grads.values():
        b = g.shape[0]
        flat = g.reshape(b, -1)
        mean = flat.mean(dim=0)
        v_norm += torch.linalg.vector_norm(torch.var(flat, dim=0, correction=1).ravel(), ord=1).item()
        gsq_t = (torch.linalg.vector_norm(mean) ** 2).item()
        gsq += gsq_t
        inner = flat @ mean
        v_ip += torch.var(inner, dim=0, correction=1).item()
        ortho = flat - torch.outer(inner, mean) / torch.linalg.vector_norm(mean) ** 2
        v_orth += torch.var(ortho, dim=0, correction=1).sum().item()

    def grow(want: float) -> int:
        return math.ceil(want if want > b else b)

    return {
        "variance_norm": v_norm,
        "variance_ip": v_ip,
        "variance_orth": v_orth,
        "grad_sqnorm": gsq,
        "batch_norm": grow(v_norm / (eta**2 * gsq)),
        "batch_ip": grow(v_ip / (theta**2 * gsq**2)),
        "batch_ip_orth": grow(max(v_ip / (theta**2 * gsq**2), v_orth / (nu**2 * gsq))),
    }


def make_adadagrad_case(name: str, hyper: dict) -> tuple[dict, dict]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    # a common direction plus per-sample noise, so the tests' statistics are far from 0
    steps = [b for b in SAMPLES]
    lr = hyper.get("lr", 1e-2)
    b_sq = hyper.get("b0_sq", 1e-2)
    wd = hyper.get("weight_decay", 0.0)
    test = hyper.get("test_type", 0)
    eta, theta, nu = (hyper.get(k, 0.1) for k in ("eta", "theta", "nu"))
    x = {k: torch.from_numpy(v.copy()) for k, v in init.items()}
    grads = {k: [] for k in SHAPES}
    outs = {k: [] for k in ("variance_norm", "variance_ip", "variance_orth", "grad_sqnorm", "batch")}
    expected = {k: np.empty((len(steps), *s), dtype=np.float32) for k, s in SHAPES.items()}
    for step, b in enumerate(steps):
        noise = np.exp(rng.uniform(np.log(0.2), np.log(5.0)))
        g_step = {}
        for k, s in SHAPES.items():
            common = rng.standard_normal(s)
            g = common[None] + noise * rng.standard_normal((b, *s))
            g_step[k] = torch.from_numpy(g.astype(np.float32))
            grads[k].append(g.astype(np.float32))
        t = batch_tests(g_step, eta, theta, nu)
        for k in ("variance_norm", "variance_ip", "variance_orth", "grad_sqnorm"):
            outs[k].append(t[k])
        outs["batch"].append(t[["batch_norm", "batch_ip", "batch_ip_orth"][test]])
        # AdaGrad-Norm on the mean gradient, one accumulator over every tensor
        gw = {k: g_step[k].mean(dim=0) + wd * x[k] for k in SHAPES}
        b_sq += sum((torch.linalg.vector_norm(v.double()) ** 2).item() for v in gw.values())
        for k in SHAPES:
            x[k] = x[k] - (lr / math.sqrt(b_sq)) * gw[k]
            expected[k][step] = x[k].numpy()
    tensors = {}
    for k in SHAPES:
        tensors[f"param.{k}"] = init[k]
        tensors[f"input.G.{k}"] = np.concatenate(grads[k], axis=0)
        tensors[f"expected.{k}"] = expected[k]
    for k, v in outs.items():
        tensors[f"out.{k}"] = np.array(v, dtype=np.float32)
    meta = {
        "rule": "adadagrad",
        "hyper": json.dumps(hyper, sort_keys=True),
        "steps": str(len(steps)),
        "samples": json.dumps(steps),
        "reference": "timlautk/AdAdaGrad tests.py (norm_test, inner_product_test, "
        "inner_product_orthogonality_test) and Adagradnorm with one accumulator, transcribed in torch",
        "torch_version": torch.__version__,
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
    for name, hyper in ADADAGRAD_CASES.items():
        tensors, meta = make_adadagrad_case(name, hyper)
        save_stable(tensors, os.path.join(args.out, f"{name}.safetensors"), meta)
        print(f"{name:32s} {meta['reference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
