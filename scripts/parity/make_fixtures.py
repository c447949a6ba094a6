#!/usr/bin/env python3
"""Write the parity fixtures: reference optimizer trajectories in f32.

One file per case, tests/parity/fixtures/<case>.safetensors, holding
  param.<tname>     the initial parameter tensor
  input.g.<tname>   [T, *shape]: the gradient handed to the optimizer at each step
  expected.<tname>  [T, *shape]: the parameter after each step
and the metadata (all strings)
  rule                        the optc stdlib rule name
  hyper                       JSON object: optc hyperparameter name -> number or boolean
                              (only those set explicitly; the rest take the rule's defaults,
                              which equal the reference's)
  steps                       "30"
  reference                   the reference call, e.g. torch.optim.Adam(lr=0.01, betas=(0.8, 0.99))
  torch_version, pytorch_optimizer_version

The references are used exactly as a user would: an optimizer over f32 torch parameters,
p.grad set before each step(), the plain single-tensor path (foreach=False, fused=False
where the constructor has those options). Tensors w0..w5 have awkward shapes; initial values and
gradients come from a NumPy generator seeded with crc32(case name), the gradient scale varying per
step. The files are byte-for-byte reproducible. Run with the project's venv:

    .venv/bin/python scripts/parity/make_fixtures.py [--out tests/parity/fixtures] [--only CASE...] \
        [--authors DIR]

The `*_authors_*` cases run the papers' authors' own optimizers, imported from DIR (default
`.authors/` at the repository root, git-ignored): `diffGrad_v2.py` from shivram1987/diffGrad and
`adan.py` from sail-sg/Adan, as fetched from GitHub (they are not vendored here).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import os
import struct
import sys
import zlib

import numpy as np
import torch
import pytorch_optimizer as po
from safetensors import safe_open

T = 30
SHAPES: dict[str, tuple[int, ...]] = {
    "w0": (1,),
    "w1": (5,),
    "w2": (7, 3),
    "w3": (4, 4, 2),
    "w4": (131,),
    "w5": (16, 16),  # |w5| ~ 16 > 10: LAMB's weight-norm clamp is active
}

# rule name -> (reference class, forced constructor kwargs that are not optc hyperparameters)
RULES = {
    "sgd": (torch.optim.SGD, {}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "amsgrad": (torch.optim.Adam, {"amsgrad": True}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {}),
    "adamax": (torch.optim.Adamax, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "lion": (po.Lion, {}),
    "lamb": (po.Lamb, {}),
    "adabelief": (po.AdaBelief, {}),
    "adan": (po.Adan, {}),
    "diffgrad": (po.DiffGrad, {}),
}

# The authors' reference code: reference key -> (file in --authors, class name, forced kwargs).
# A reference key `RULE.authors` is run for the optc rule RULE.
AUTHORS = {
    "diffgrad.authors": ("diffGrad_v2.py", "diffgrad", {}),
    "adan.authors": ("adan.py", "Adan", {}),
}

# optc hyperparameter -> the reference's name for it.
RENAMES = {
    "adan": {"no_prox": "weight_decouple"},
}

# The optc hyperparameter values under which a rule is this reference, where the rule's defaults
# follow another reference (diffgrad's defaults are the authors' diffGrad_v2): recorded in every
# fixture of the reference, and passed to its constructor unless listed in NOT_ARGS.
REFERENCE_SETTINGS = {
    "diffgrad": {"weight_decouple": True, "v_eps": 1e-15},
}
NOT_ARGS = {
    "diffgrad": ("v_eps",),
}

# Options of pytorch_optimizer classes that are not named constructor arguments but are read from
# the param group (passed through **kwargs) and that the rules carry.
EXTRA_KWARGS = {
    "lion": ("cautious",),
    "lamb": ("adam_debias",),
    "adabelief": ("adam_debias",),
    "diffgrad": ("adam_debias",),
}

# (case name, rule, optc hyperparameters). betas are split into beta1, beta2, beta3.
CASES: list[tuple[str, str, dict]] = [
    # --- torch.optim.SGD
    ("sgd_default", "sgd", {}),
    ("sgd_wd", "sgd", {"lr": 0.1, "weight_decay": 0.1}),
    ("sgd_momentum_dampening_wd", "sgd",
     {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("sgd_nesterov_wd_maximize", "sgd",
     {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05, "maximize": True}),
    # --- torch.optim.Adam
    ("adam_default", "adam", {}),
    ("adam_amsgrad_wd", "adam",
     {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.05, "amsgrad": True}),
    ("adam_decoupled_wd_maximize", "adam",
     {"lr": 0.02, "beta2": 0.95, "eps": 1e-4, "weight_decay": 0.1, "decoupled_weight_decay": True,
      "maximize": True}),
    # --- torch.optim.AdamW
    ("adamw_default", "adamw", {}),
    ("adamw_amsgrad_maximize", "adamw",
     {"lr": 0.01, "beta1": 0.85, "beta2": 0.95, "eps": 1e-4, "weight_decay": 0.1, "amsgrad": True,
      "maximize": True}),
    ("adamw_large_wd", "adamw", {"lr": 0.05, "beta1": 0.7, "beta2": 0.9, "weight_decay": 0.5}),
    # --- torch.optim.Adam(amsgrad=True)
    ("amsgrad_default", "amsgrad", {}),
    ("amsgrad_wd_maximize", "amsgrad",
     {"lr": 0.01, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.05, "maximize": True}),
    ("amsgrad_decoupled_wd", "amsgrad",
     {"lr": 0.02, "beta2": 0.9, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    # --- torch.optim.NAdam
    ("nadam_default", "nadam", {}),
    ("nadam_wd_momentum_decay", "nadam",
     {"lr": 0.01, "beta1": 0.85, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.05,
      "momentum_decay": 0.01}),
    ("nadam_decoupled_wd_maximize", "nadam",
     {"lr": 0.01, "beta2": 0.95, "weight_decay": 0.1, "decoupled_weight_decay": True,
      "maximize": True}),
    # --- torch.optim.RAdam
    ("radam_default", "radam", {}),
    ("radam_wd", "radam",
     {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.05}),
    ("radam_decoupled_wd_maximize", "radam",
     {"lr": 0.01, "beta2": 0.95, "weight_decay": 0.1, "decoupled_weight_decay": True,
      "maximize": True}),
    # --- torch.optim.Adamax
    ("adamax_default", "adamax", {}),
    ("adamax_wd_maximize", "adamax",
     {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-2, "weight_decay": 0.05, "maximize": True}),
    # --- torch.optim.Adagrad
    ("adagrad_default", "adagrad", {}),
    ("adagrad_lr_decay_init_wd_maximize", "adagrad",
     {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.05, "initial_accumulator_value": 0.5,
      "eps": 1e-3, "maximize": True}),
    # --- torch.optim.RMSprop
    ("rmsprop_default", "rmsprop", {}),
    ("rmsprop_centered_momentum_wd", "rmsprop",
     {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05, "momentum": 0.9,
      "centered": True}),
    ("rmsprop_momentum_maximize", "rmsprop", {"lr": 0.005, "momentum": 0.5, "maximize": True}),
    ("rmsprop_centered_maximize", "rmsprop",
     {"lr": 0.003, "alpha": 0.95, "centered": True, "maximize": True}),
    # --- torch.optim.Adadelta
    ("adadelta_default", "adadelta", {}),
    ("adadelta_wd_maximize", "adadelta",
     {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.05, "maximize": True}),
    # --- pytorch_optimizer.Lion
    ("lion_default", "lion", {}),
    ("lion_decoupled_wd", "lion", {"lr": 1e-3, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.5}),
    ("lion_coupled_wd_maximize", "lion",
     {"lr": 1e-3, "weight_decay": 0.1, "weight_decouple": False, "maximize": True}),
    ("lion_fixed_decay", "lion", {"lr": 1e-3, "weight_decay": 0.01, "fixed_decay": True}),
    ("lion_cautious_wd", "lion", {"lr": 1e-3, "weight_decay": 0.1, "cautious": True}),
    # --- pytorch_optimizer.Lamb
    ("lamb_default", "lamb", {}),
    ("lamb_coupled_wd_prenorm", "lamb",
     {"lr": 0.01, "beta1": 0.85, "beta2": 0.99, "eps": 1e-4, "weight_decay": 0.05,
      "weight_decouple": False, "pre_norm": True, "max_grad_norm": 1.0, "grad_averaging": False}),
    ("lamb_decoupled_fixed_maximize", "lamb",
     {"lr": 0.01, "weight_decay": 0.01, "fixed_decay": True, "maximize": True}),
    ("lamb_rectify_wd", "lamb", {"lr": 0.01, "rectify": True, "weight_decay": 0.05}),
    ("lamb_rectify_sgd_adam", "lamb",
     {"lr": 0.01, "rectify": True, "degenerated_to_sgd": True, "adam": True,
      "n_sma_threshold": 6}),
    ("lamb_adam_debias", "lamb", {"lr": 0.01, "weight_decay": 0.01, "adam_debias": True}),
    # --- pytorch_optimizer.AdaBelief
    ("adabelief_default", "adabelief", {}),
    ("adabelief_coupled_wd_amsbound", "adabelief",
     {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.05,
      "weight_decouple": False, "ams_bound": True}),
    ("adabelief_decoupled_fixed_maximize", "adabelief",
     {"lr": 0.01, "eps": 1e-4, "weight_decay": 0.01, "fixed_decay": True, "maximize": True}),
    ("adabelief_rectify", "adabelief", {"lr": 0.01, "rectify": True}),
    ("adabelief_rectify_nosgd_amsbound", "adabelief",
     {"lr": 0.01, "rectify": True, "degenerated_to_sgd": False, "n_sma_threshold": 6,
      "ams_bound": True}),
    ("adabelief_adam_debias", "adabelief", {"lr": 0.01, "beta2": 0.99, "adam_debias": True}),
    # --- pytorch_optimizer.Adan
    ("adan_default", "adan", {}),
    ("adan_clip_prox_wd", "adan",
     {"lr": 0.01, "weight_decay": 0.02, "max_grad_norm": 1.0, "eps": 1e-4}),
    ("adan_noprox_wd_betas", "adan",
     {"lr": 0.01, "beta1": 0.9, "beta2": 0.9, "beta3": 0.95, "weight_decay": 0.05,
      "no_prox": True, "max_grad_norm": 5.0}),
    # --- the authors' sail-sg/Adan
    ("adan_authors_default", "adan.authors", {}),
    ("adan_authors_noprox_clip", "adan.authors",
     {"lr": 0.01, "beta1": 0.9, "beta2": 0.9, "beta3": 0.95, "weight_decay": 0.05,
      "no_prox": True, "max_grad_norm": 2.0}),
    ("adan_authors_prox_wd", "adan.authors",
     {"lr": 0.02, "weight_decay": 0.02, "eps": 1e-6}),
    # --- pytorch_optimizer.DiffGrad
    ("diffgrad_default", "diffgrad", {}),
    ("diffgrad_coupled_wd_amsbound", "diffgrad",
     {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.05,
      "weight_decouple": False, "ams_bound": True}),
    ("diffgrad_decoupled_fixed_maximize", "diffgrad",
     {"lr": 0.01, "weight_decay": 0.01, "fixed_decay": True, "maximize": True}),
    ("diffgrad_rectify", "diffgrad", {"lr": 0.01, "rectify": True}),
    ("diffgrad_rectify_nosgd", "diffgrad",
     {"lr": 0.01, "rectify": True, "degenerated_to_sgd": False}),
    ("diffgrad_adam_debias", "diffgrad", {"lr": 0.01, "beta2": 0.99, "adam_debias": True}),
    # --- the authors' shivram1987/diffGrad diffGrad_v2.py (the rule's defaults)
    ("diffgrad_authors_default", "diffgrad.authors", {}),
    ("diffgrad_authors_wd_betas", "diffgrad.authors",
     {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05}),
]

AUTHORS_DIR = None


def reference(key: str):
    """The reference class and forced kwargs of a reference key."""
    if key in RULES:
        return RULES[key]
    file, cls_name, forced = AUTHORS[key]
    import importlib.util
    path = os.path.join(AUTHORS_DIR, file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: fetch the authors' {file} (see the module docs)")
    spec = importlib.util.spec_from_file_location(f"authors_{cls_name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, cls_name), forced


def ctor_kwargs(key: str, hyper: dict) -> dict:
    """optc hyperparameters -> the reference constructor's keyword arguments."""
    cls, forced = reference(key)
    rule = key.split(".")[0]
    renames = RENAMES.get(rule, {}) if key in RULES else {}
    hyper = {renames.get(k, k): v for k, v in hyper.items()
             if not (key in RULES and k in NOT_ARGS.get(rule, ()))}
    sig = inspect.signature(cls.__init__).parameters
    kw: dict = {}
    betas = [hyper[k] for k in ("beta1", "beta2", "beta3") if k in hyper]
    if betas:
        default = list(sig["betas"].default)
        for i, k in enumerate(("beta1", "beta2", "beta3")):
            if k in hyper:
                default[i] = hyper[k]
        kw["betas"] = tuple(default)
    for k, v in hyper.items():
        if k in ("beta1", "beta2", "beta3"):
            continue
        if k not in sig and k not in EXTRA_KWARGS.get(key, ()):
            raise KeyError(f"{cls.__name__} has no argument {k!r}")
        kw[k] = v
    kw.update(forced)
    # the plain single-tensor path
    for k in ("foreach", "fused"):
        if k in sig:
            kw[k] = False
    order = list(sig)
    return dict(sorted(kw.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def reference_string(key: str, kw: dict) -> str:
    cls, _ = reference(key)
    if key in AUTHORS:
        mod = {"diffgrad.authors": "shivram1987/diffGrad diffGrad_v2",
               "adan.authors": "sail-sg/Adan adan"}[key]
    else:
        mod = "torch.optim" if cls.__module__.startswith("torch.optim") else "pytorch_optimizer"
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return f"{mod}.{cls.__name__}({args})"


def make_case(name: str, key: str, hyper: dict) -> tuple[dict, dict]:
    rule = key.split(".")[0]
    if key in RULES:
        hyper = {**REFERENCE_SETTINGS.get(rule, {}), **hyper}
    seed = zlib.crc32(name.encode())
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    # per-step scale, log-uniform in [0.1, 3], so that second moments rise and fall
    scales = np.exp(rng.uniform(np.log(0.1), np.log(3.0), size=T))
    grads = {
        k: (rng.standard_normal((T, *s)) * scales.reshape((T,) + (1,) * len(s))).astype(np.float32)
        for k, s in SHAPES.items()
    }

    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    kw = ctor_kwargs(key, hyper)
    cls, _ = reference(key)
    opt = cls(list(params.values()), **kw)

    expected = {k: np.empty((T, *s), dtype=np.float32) for k, s in SHAPES.items()}
    for step in range(T):
        for k, p in params.items():
            # a fresh tensor each step: some references modify p.grad in place
            p.grad = torch.from_numpy(grads[k][step].copy())
        opt.step()
        for k, p in params.items():
            expected[k][step] = p.detach().numpy()
        for k, v in expected.items():
            if not np.all(np.isfinite(v[step])):
                raise RuntimeError(f"{name}: non-finite parameter at step {step + 1}")

    tensors = {}
    for k in SHAPES:
        tensors[f"param.{k}"] = init[k]
        tensors[f"input.g.{k}"] = grads[k]
        tensors[f"expected.{k}"] = expected[k]
    meta = {
        "rule": rule,
        "hyper": json.dumps(hyper, sort_keys=True),
        "steps": str(T),
        "reference": reference_string(key, kw),
        "torch_version": torch.__version__,
        "pytorch_optimizer_version": importlib.metadata.version("pytorch-optimizer"),
    }
    return tensors, meta


def save_stable(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file byte-for-byte reproducibly (safetensors.save_file orders the
    metadata map differently from run to run): metadata and tensors in sorted order, f32
    little-endian, header padded with spaces to a multiple of 8 bytes as the format asks."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    # read it back with the safetensors library itself
    with safe_open(path, "np") as f:
        assert f.metadata() == metadata
        for name in tensors:
            assert np.array_equal(f.get_tensor(name), tensors[name], equal_nan=True)


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(root, "tests", "parity", "fixtures"))
    ap.add_argument("--only", nargs="*", help="case names to write (default: all)")
    ap.add_argument("--authors", default=os.path.join(root, ".authors"),
                    help="folder holding the authors' diffGrad_v2.py and adan.py")
    args = ap.parse_args()
    global AUTHORS_DIR
    AUTHORS_DIR = args.authors

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    for name, rule, hyper in CASES:
        if args.only and name not in args.only:
            continue
        tensors, meta = make_case(name, rule, hyper)
        path = os.path.join(args.out, f"{name}.safetensors")
        save_stable(tensors, path, meta)
        print(f"{name:40s} {meta['reference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
