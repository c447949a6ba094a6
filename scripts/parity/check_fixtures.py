#!/usr/bin/env python3
"""Check the parity fixtures against a NumPy transcription of stdlib/rules/*.opt.

Each function below is a line-by-line transcription of one rule file (same statements, same
order): per-element values are f32 NumPy arrays (or f64 with --f64), scalars are Python floats
(f64), as optc computes them. It replays every fixture and reports the largest error against the
reference trajectory: the normwise relative error over the group (the pass criterion, --tol), the
largest error relative to the largest displacement theta_t - theta_0 (it sees convention errors that
are small next to |theta|), and the absolute tolerance an elementwise test would need besides
rtol = --tol (elements that pass near zero make a purely relative elementwise test fail on f32
rounding alone).

This validates the conventions written in stdlib/REFERENCES.md and the arithmetic of the rule files
before the compiler exists; it is not a substitute for running the compiled rules.

    .venv/bin/python scripts/parity/check_fixtures.py [--f64] [CASE...]
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import safe_open

DT = np.float32


def sqnorm(xs):  # global reduction over the group, accumulated in f64
    return float(sum(np.sum(x.astype(np.float64) ** 2) for x in xs.values()))


def tnorm(x):  # per-tensor norm
    return float(np.sqrt(np.sum(x.astype(np.float64) ** 2)))


def sig(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


class Rule:
    """Defaults of each rule file, and per-tensor state zero-filled like the runtime's."""

    DEFAULTS: dict[str, dict] = {
        "sgd": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
        "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                     maximize=False, decoupled_weight_decay=False),
        "adamw": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                      maximize=False),
        "amsgrad": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                        decoupled_weight_decay=False),
        "nadam": dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                      decoupled_weight_decay=False, maximize=False),
        "radam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                      decoupled_weight_decay=False, maximize=False),
        "adamax": dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False),
        "adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                        maximize=False),
        "rmsprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                        maximize=False),
        "adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
        "lion": dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, weight_decouple=True, fixed_decay=False,
                     maximize=False, cautious=False),
        "lamb": dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, weight_decouple=True, fixed_decay=False,
                     rectify=False, degenerated_to_sgd=False, n_sma_threshold=5, grad_averaging=True,
                     max_grad_norm=1.0, adam=False, pre_norm=False, eps=1e-6, maximize=False, adam_debias=False),
        "adabelief": dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, weight_decouple=True,
                          fixed_decay=False, rectify=False, n_sma_threshold=5, degenerated_to_sgd=True,
                          ams_bound=False, eps=1e-16, maximize=False, adam_debias=False),
        "adan": dict(lr=1e-3, beta1=0.98, beta2=0.92, beta3=0.99, weight_decay=0.0, no_prox=False,
                     max_grad_norm=0.0, eps=1e-8, maximize=False),
        "diffgrad": dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, weight_decouple=False, v_eps=0.0,
                         fixed_decay=False, rectify=False, n_sma_threshold=5, degenerated_to_sgd=True,
                         ams_bound=False, eps=1e-8, maximize=False, adam_debias=False),
    }


def rect_step_size(h, t, lr_fallback_scale):
    """The step-size block shared by lamb, adabelief and diffgrad."""
    bias_correction1 = 1 - h["beta1"] ** t
    n_sma_max = 2 / (1 - h["beta2"]) - 1
    beta2_t = h["beta2"] ** t
    n_sma = n_sma_max - 2 * t * beta2_t / (1 - beta2_t)
    rectified = n_sma >= h["n_sma_threshold"]
    if rectified:
        rt = math.sqrt((1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max
                       / (n_sma_max - 2))
    else:
        rt = 1 if h["degenerated_to_sgd"] else -1
    base_step = h["lr"] * rt if h["rectify"] else h["lr"] * lr_fallback_scale(beta2_t)
    step_size = base_step if h["adam_debias"] else base_step / bias_correction1
    return step_size, rectified


def step(rule, h, t, th, g, S):
    """One step of `rule` on the group: th (params), g (inputs), S (state dict of dicts)."""
    ks = list(th)
    z = lambda: {k: np.zeros_like(th[k]) for k in ks}  # noqa: E731
    for name in ("m", "v", "vmax", "buf", "u", "s", "smax", "square_avg", "grad_avg", "acc_delta", "n", "g_prev"):
        S.setdefault(name, z())
    if rule == "sgd":
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            gw = gm + h["weight_decay"] * th[k]
            if h["momentum"] != 0:
                S["buf"][k] = gw if t == 1 else h["momentum"] * S["buf"][k] + (1 - h["dampening"]) * gw
            if h["momentum"] == 0:
                d = gw
            else:
                d = gw + h["momentum"] * S["buf"][k] if h["nesterov"] else S["buf"][k]
            th[k] = th[k] - h["lr"] * d
    elif rule in ("adam", "adamw", "amsgrad"):
        decoupled = True if rule == "adamw" else h["decoupled_weight_decay"]
        ams = True if rule == "amsgrad" else h["amsgrad"]
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            if decoupled:
                th[k] = th[k] * (1 - h["lr"] * h["weight_decay"])
            gw = gm if decoupled else gm + h["weight_decay"] * th[k]
            S["m"][k] = S["m"][k] + (1 - h["beta1"]) * (gw - S["m"][k])
            S["v"][k] = h["beta2"] * S["v"][k] + (1 - h["beta2"]) * gw * gw
            if ams:
                S["vmax"][k] = np.maximum(S["vmax"][k], S["v"][k])
            vhat = S["vmax"][k] if ams else S["v"][k]
            step_size = h["lr"] / (1 - h["beta1"] ** t)
            denom = np.sqrt(vhat) / math.sqrt(1 - h["beta2"] ** t) + h["eps"]
            th[k] = th[k] - step_size * (S["m"][k] / denom)
    elif rule == "nadam":
        S.setdefault("mu_product", 1.0)
        bias_correction2 = 1 - h["beta2"] ** t
        mu = h["beta1"] * (1 - 0.5 * 0.96 ** (t * h["momentum_decay"]))
        mu_next = h["beta1"] * (1 - 0.5 * 0.96 ** ((t + 1) * h["momentum_decay"]))
        S["mu_product"] = S["mu_product"] * mu
        mp = S["mu_product"]
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            if h["decoupled_weight_decay"]:
                th[k] = th[k] * (1 - h["lr"] * h["weight_decay"])
            gw = gm if h["decoupled_weight_decay"] else gm + h["weight_decay"] * th[k]
            S["m"][k] = S["m"][k] + (1 - h["beta1"]) * (gw - S["m"][k])
            S["v"][k] = h["beta2"] * S["v"][k] + (1 - h["beta2"]) * gw * gw
            denom = np.sqrt(S["v"][k] / bias_correction2) + h["eps"]
            th[k] = th[k] - h["lr"] * (1 - mu) / (1 - mp) * (gw / denom)
            th[k] = th[k] - h["lr"] * mu_next / (1 - mp * mu_next) * (S["m"][k] / denom)
    elif rule == "radam":
        bias_correction1 = 1 - h["beta1"] ** t
        bias_correction2 = 1 - h["beta2"] ** t
        rho_inf = 2 / (1 - h["beta2"]) - 1
        rho_t = rho_inf - 2 * t * h["beta2"] ** t / bias_correction2
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) \
            if rho_t > 5 else 0
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            if h["decoupled_weight_decay"]:
                th[k] = th[k] * (1 - h["lr"] * h["weight_decay"])
            gw = gm if h["decoupled_weight_decay"] else gm + h["weight_decay"] * th[k]
            S["m"][k] = S["m"][k] + (1 - h["beta1"]) * (gw - S["m"][k])
            S["v"][k] = h["beta2"] * S["v"][k] + (1 - h["beta2"]) * gw * gw
            adaptive_lr = math.sqrt(bias_correction2) / (np.sqrt(S["v"][k]) + h["eps"])
            m_hat = S["m"][k] / bias_correction1
            th[k] = th[k] - m_hat * h["lr"] * adaptive_lr * rect if rho_t > 5 else th[k] - m_hat * h["lr"]
    elif rule == "adamax":
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            gw = gm + h["weight_decay"] * th[k]
            S["m"][k] = S["m"][k] + (1 - h["beta1"]) * (gw - S["m"][k])
            S["u"][k] = np.maximum(h["beta2"] * S["u"][k], np.abs(gw) + h["eps"])
            clr = h["lr"] / (1 - h["beta1"] ** t)
            th[k] = th[k] - clr * (S["m"][k] / S["u"][k])
    elif rule == "adagrad":
        if t == 1:
            S["sum_sq"] = {k: np.full_like(th[k], h["initial_accumulator_value"]) for k in ks}
        clr = h["lr"] / (1 + (t - 1) * h["lr_decay"])
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            gw = gm + h["weight_decay"] * th[k]
            S["sum_sq"][k] = S["sum_sq"][k] + gw * gw
            th[k] = th[k] - clr * (gw / (np.sqrt(S["sum_sq"][k]) + h["eps"]))
    elif rule == "rmsprop":
        a = h["alpha"]
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            gw = gm + h["weight_decay"] * th[k]
            S["square_avg"][k] = a * S["square_avg"][k] + (1 - a) * gw * gw
            if h["centered"]:
                S["grad_avg"][k] = S["grad_avg"][k] + (1 - a) * (gw - S["grad_avg"][k])
                avg = np.sqrt(S["square_avg"][k] - S["grad_avg"][k] * S["grad_avg"][k]) + h["eps"]
            else:
                avg = np.sqrt(S["square_avg"][k]) + h["eps"]
            if h["momentum"] > 0:
                S["buf"][k] = h["momentum"] * S["buf"][k] + gw / avg
                th[k] = th[k] - h["lr"] * S["buf"][k]
            else:
                th[k] = th[k] - h["lr"] * (gw / avg)
    elif rule == "adadelta":
        r = h["rho"]
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            gw = gm + h["weight_decay"] * th[k]
            S["square_avg"][k] = r * S["square_avg"][k] + (1 - r) * gw * gw
            std = np.sqrt(S["square_avg"][k] + h["eps"])
            delta = np.sqrt(S["acc_delta"][k] + h["eps"]) / std * gw
            S["acc_delta"][k] = r * S["acc_delta"][k] + (1 - r) * delta * delta
            th[k] = th[k] - h["lr"] * delta
    elif rule == "lion":
        decay_scale = 1 if h["fixed_decay"] else h["lr"]
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            if h["weight_decouple"]:
                th[k] = th[k] * (1 - h["weight_decay"] * decay_scale)
            gw = gm if h["weight_decouple"] else gm + h["weight_decay"] * th[k]
            update = np.sign(S["m"][k] + (1 - h["beta1"]) * (gw - S["m"][k]))
            S["m"][k] = S["m"][k] + (1 - h["beta2"]) * (gw - S["m"][k])
            agree = (update * gw > 0).astype(update.dtype)
            cautious_scale = th[k].size / (float(np.sum(agree)) + 1)
            d = update * (agree * cautious_scale) if h["cautious"] else update
            th[k] = th[k] - h["lr"] * d
    elif rule == "lamb":
        step_size, rectified = rect_step_size(h, t, lambda b2t: 1.0)
        grad_scale = 1 - h["beta1"] if h["grad_averaging"] else 1
        global_norm = math.sqrt(sqnorm(g)) + h["eps"]
        clip = 1 if h["max_grad_norm"] == 0 else min(h["max_grad_norm"] / global_norm, 1)
        decay_scale = 1 if h["fixed_decay"] else h["lr"]
        for k in ks:
            gs = g[k] * clip if h["pre_norm"] else g[k]
            gm = -gs if h["maximize"] else gs
            S["m"][k] = h["beta1"] * S["m"][k] + grad_scale * gm
            S["v"][k] = h["beta2"] * S["v"][k] + (1 - h["beta2"]) * gm * gm
            if h["weight_decouple"]:
                th[k] = th[k] * (1 - h["weight_decay"] * decay_scale)
            denom = np.sqrt(S["v"][k]) + h["eps"]
            if h["rectify"]:
                d = S["m"][k] / denom if rectified else S["m"][k]
            else:
                d = S["m"][k] / denom if h["weight_decouple"] else S["m"][k] / denom + h["weight_decay"] * th[k]
            update = th[k] - step_size * d if h["rectify"] else d
            weight_norm = min(max(tnorm(th[k]), 0), 10)
            p_norm = tnorm(update)
            trust = 1 if (h["adam"] or weight_norm == 0 or p_norm == 0) else weight_norm / (p_norm + h["eps"])
            if not (h["rectify"] and step_size <= 0):
                th[k] = th[k] - step_size * trust * d
    elif rule == "adabelief":
        step_size, rectified = rect_step_size(h, t, lambda b2t: 1.0)
        bias_correction2_sqrt = math.sqrt(1 - h["beta2"] ** t)
        decay_scale = 1 if h["fixed_decay"] else h["lr"]
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            if h["weight_decouple"]:
                th[k] = th[k] * (1 - h["weight_decay"] * decay_scale)
            gw = gm if h["weight_decouple"] else gm + h["weight_decay"] * th[k]
            S["m"][k] = S["m"][k] + (1 - h["beta1"]) * (gw - S["m"][k])
            residual = gw - S["m"][k]
            S["s"][k] = h["beta2"] * S["s"][k] + (1 - h["beta2"]) * residual * residual + h["eps"]
            if h["ams_bound"]:
                S["smax"][k] = np.maximum(S["smax"][k], S["s"][k])
            root = np.sqrt(S["smax"][k]) if h["ams_bound"] else np.sqrt(S["s"][k])
            if not h["rectify"]:
                th[k] = th[k] - step_size * (S["m"][k] / (root / bias_correction2_sqrt + h["eps"]))
            elif rectified:
                th[k] = th[k] - step_size * (S["m"][k] / (root + h["eps"]))
            elif step_size > 0:
                th[k] = th[k] - step_size * S["m"][k]
    elif rule == "adan":
        b1, b2, b3, lr, wd = h["beta1"], h["beta2"], h["beta3"], h["lr"], h["weight_decay"]
        clip = min(h["max_grad_norm"] / (math.sqrt(sqnorm(g)) + h["eps"]), 1) if h["max_grad_norm"] > 0 else 1
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            gc = gm * clip
            diff = np.zeros_like(gc) if t == 1 else gc - S["g_prev"][k]
            S["m"][k] = S["m"][k] + (1 - b1) * (gc - S["m"][k])
            S["v"][k] = S["v"][k] + (1 - b2) * (diff - S["v"][k])
            nesterov_g = b2 * diff + gc
            S["n"][k] = b3 * S["n"][k] + (1 - b3) * nesterov_g * nesterov_g
            denom = np.sqrt(S["n"][k]) / math.sqrt(1 - b3 ** t) + h["eps"]
            if h["no_prox"]:
                th[k] = th[k] * (1 - lr * wd)
            th[k] = th[k] - lr / (1 - b1 ** t) * (S["m"][k] / denom)
            th[k] = th[k] - lr * b2 / (1 - b2 ** t) * (S["v"][k] / denom)
            if not h["no_prox"]:
                th[k] = th[k] / (1 + lr * wd)
            S["g_prev"][k] = gc
    elif rule == "diffgrad":
        step_size, rectified = rect_step_size(h, t, lambda b2t: math.sqrt(1 - b2t))
        decay_scale = 1 if h["fixed_decay"] else h["lr"]
        for k in ks:
            gm = -g[k] if h["maximize"] else g[k]
            if h["weight_decouple"]:
                th[k] = th[k] * (1 - h["weight_decay"] * decay_scale)
            gw = gm if h["weight_decouple"] else gm + h["weight_decay"] * th[k]
            S["m"][k] = S["m"][k] + (1 - h["beta1"]) * (gw - S["m"][k])
            S["v"][k] = h["beta2"] * S["v"][k] + (1 - h["beta2"]) * gw * gw
            if h["ams_bound"]:
                S["vmax"][k] = np.maximum(S["vmax"][k], S["v"][k])
            denom = (np.sqrt(S["vmax"][k] + h["v_eps"]) if h["ams_bound"] else np.sqrt(S["v"][k] + h["v_eps"])) + h["eps"]
            dfc = sig(np.abs(S["g_prev"][k] - gw)) * S["m"][k]
            if not h["rectify"] or rectified:
                th[k] = th[k] - step_size * (dfc / denom)
            elif step_size > 0:
                th[k] = th[k] - step_size * S["m"][k]
            S["g_prev"][k] = gw
    else:
        raise KeyError(rule)


def check(path: str, dt, rtol: float = 1e-5) -> tuple[float, float, float]:
    with safe_open(path, "np") as f:
        meta = f.metadata()
        ts = {k: f.get_tensor(k) for k in f.keys()}
    rule = meta["rule"]
    h = dict(Rule.DEFAULTS[rule])
    for k, v in json.loads(meta["hyper"]).items():
        if k not in h:
            raise KeyError(f"{path}: rule {rule} has no hyperparameter {k}")
        h[k] = v
    names = sorted(k.split(".", 1)[1] for k in ts if k.startswith("param."))
    th0 = {k: ts[f"param.{k}"].astype(dt) for k in names}
    th = {k: v.copy() for k, v in th0.items()}
    S: dict = {}
    worst_rel, worst_disp, worst_atol = 0.0, 0.0, 0.0
    for i in range(int(meta["steps"])):
        g = {k: ts[f"input.g.{k}"][i].astype(dt) for k in names}
        step(rule, h, i + 1, th, g, S)
        max_err, max_disp, sq_err, sq_exp = 0.0, 0.0, 0.0, 0.0
        for k in names:
            exp = ts[f"expected.{k}"][i].astype(np.float64)
            got = th[k].astype(np.float64)
            err = np.abs(got - exp)
            sq_err += float(np.sum(err**2))
            sq_exp += float(np.sum(exp**2))
            max_err = max(max_err, float(np.max(err)))
            max_disp = max(max_disp, float(np.max(np.abs(exp - th0[k].astype(np.float64)))))
            # the absolute tolerance an elementwise test |got - exp| <= atol + rtol * |exp| would need
            worst_atol = max(worst_atol, float(np.max(err - rtol * np.abs(exp))))
        # normwise relative error over the whole group at this step
        worst_rel = max(worst_rel, math.sqrt(sq_err / max(sq_exp, 1e-300)))
        # largest error over the group, relative to the largest displacement so far
        worst_disp = max(worst_disp, max_err / max(max_disp, 1e-30))
    return worst_rel, worst_disp, worst_atol


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--f64", action="store_true", help="per-element values in f64 instead of f32")
    ap.add_argument("--dir", default=os.path.join(root, "tests", "parity", "fixtures"))
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    dt = np.float64 if args.f64 else np.float32
    bad = 0
    for path in sorted(glob.glob(os.path.join(args.dir, "*.safetensors"))):
        case = os.path.basename(path)[: -len(".safetensors")]
        if args.cases and case not in args.cases:
            continue
        rel, disp, atol = check(path, dt, args.tol)
        ok = rel <= args.tol
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {case:40s} rel {rel:.1e}  err/displacement {disp:.1e}  "
              f"atol needed at rtol={args.tol:g}: {max(atol, 0):.1e}")
    print(f"{'all' if not bad else bad} {'passed' if not bad else 'failed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
