#!/usr/bin/env python3
"""Write the CBO parity fixtures: CBXpy's cbx.dynamics.CBO on the Rastrigin function, in f64.

One JSON file per case, tests/parity/cbo/<case>.json:
  hyper       optc hyperparameters (the rule's names; sigma is 0: numpy's noise bits are not
              optc's, tests/particles.rs checks the noise)
  shapes      the tensors each particle is split into (their sizes add up to CBXpy's d)
  x0          [K][d] the particles' starting points
  f           [T][K] the objective values CBXpy evaluated at each step (at the step's particles)
  x           [T][K][d] the particles after each step
  consensus   [T][d] the consensus point of each step
Run with the project's venv (pip install cbx==1.0.4):

    .venv/bin/python scripts/parity/make_cbo_fixtures.py [--out tests/parity/cbo]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import zlib

import numpy as np
from cbx.dynamics import CBO

T = 20
SHAPES = [[3], [5], [1]]  # d = 9
D = 9

CASES = {
    "cbo_k1": (1, {"sigma": 0.0}),
    "cbo_k3": (3, {"sigma": 0.0, "alpha": 3.0, "lamda": 0.7, "dt": 0.05}),
    "cbo_k50": (50, {"sigma": 0.0, "alpha": 10.0, "dt": 0.1}),
}


def rastrigin(x: np.ndarray) -> np.ndarray:
    return 10 * x.shape[-1] + np.sum(x * x - 10 * np.cos(2 * np.pi * x), axis=-1)


def make_case(name: str, k: int, hyper: dict) -> dict:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x0 = rng.uniform(-3, 3, size=(1, k, D))
    kw = {"lamda": 1.0, "dt": 0.01, "alpha": 1.0, **hyper}
    dyn = CBO(rastrigin, x=x0.copy(), noise="isotropic", verbosity=0, **kw)
    fs, xs, cs = [], [], []
    for _ in range(T):
        fs.append(rastrigin(dyn.x[0]).tolist())
        dyn.step()
        xs.append(dyn.x[0].tolist())
        cs.append(np.asarray(dyn.consensus)[0].reshape(-1).tolist())
    return {
        "hyper": hyper,
        "shapes": SHAPES,
        "x0": x0[0].tolist(),
        "f": fs,
        "x": xs,
        "consensus": cs,
        "reference": f"cbx.dynamics.CBO(rastrigin, noise='isotropic', {kw})",
        "cbx_version": importlib.metadata.version("cbx"),
    }


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(root, "tests", "parity", "cbo"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (k, hyper) in CASES.items():
        case = make_case(name, k, hyper)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(case, f, sort_keys=True)
            f.write("\n")
        print(f"{name:10s} {case['reference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
