#!/usr/bin/env python3
"""optc's CPU step against its peers, from one run on one machine.

Peers, each timed in this process over the same number of f32 elements on the same number of
threads (torch.set_num_threads and OMP_NUM_THREADS):

- torch.optim.Adam / AdamW / SGD (momentum 0.9) with fused=True;
- DeepSpeedCPUAdam (what ZeRO-Offload runs) in Adam and AdamW mode, f32 params, and with bf16
  params (f32 state);
- pytorch-optimizer's Adan, DiffGrad and Lion;
- torch.nn.utils.clip_grad_norm_ followed by fused AdamW (the two-call form), against optc's
  fused global-norm clipping + AdamW (one rule: the norm is a reduction of the first pass).

optc's figures come from `optc bench` (a subprocess of this script, run right after the peer it
is compared with), which reports the median step time and the rule's own access-pattern ceiling.
The peer and optc take turns --rounds times (default 3), each time the median of --steps steps
after two warm-up steps; a row prints the medians of the rounds and the ratio peer time / optc
time (above 1: optc is faster). On a shared machine single runs vary by tens of percent, hence
the rounds.

Run through scripts/peers.sh, which sets up the virtual environment and builds optc.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

CLIP_ADAMW = """
/// AdamW behind global-norm clipping, as torch's clip_grad_norm_(max_norm) then AdamW.
rule clip_adamw(lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 1e-2,
                max_norm = 1.0) {
    param theta
    input g
    state m = 0, v = 0
    let clip = min(max_norm / (norm(g) + 1e-6), 1)
    let gc = g * clip
    theta = theta * (1 - lr * weight_decay)
    m = m + (1 - beta1) * (gc - m)
    v = beta2 * v + (1 - beta2) * gc * gc
    let step_size = lr / (1 - beta1^t)
    let denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    theta = theta - step_size * m / denom
}
"""


def median_step(step, steps):
    step()
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_case(torch, make, n, steps, dtype=None, clip=None):
    dtype = dtype or torch.float32
    p = torch.nn.Parameter(torch.full((n,), 0.5, dtype=dtype))
    p.grad = torch.full((n,), 1e-3, dtype=dtype)
    opt = make([p])

    def step():
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()

    with torch.no_grad():
        ms = median_step(step, steps)
    del opt, p
    return ms


def optc_bench(optc, rule, args, extra=()):
    cmd = [optc, "bench", rule, "--elems", str(args.elems), "--threads", str(args.threads),
           "--steps", str(args.steps), "--engine", args.engine, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"peers: {' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    ms = float(re.search(r"step time \(median of \d+\)\s+([0-9.]+) ms", out.stdout).group(1))
    ratio = float(re.search(r"ratio to the pattern\s+([0-9.]+)", out.stdout).group(1))
    return ms, ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optc", required=True, help="the optc binary (release build)")
    ap.add_argument("--elems", type=int, default=1 << 26)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--engine", default="native", help="optc's engine (native or cranelift)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="times each peer and optc take turns (medians of the rounds)")
    ap.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeedCPUAdam out")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import importlib.metadata
    import torch
    import pytorch_optimizer as po

    torch.set_num_threads(args.threads)
    n, steps = args.elems, args.steps
    ds = None
    if not args.no_deepspeed:
        from deepspeed.ops.adam import DeepSpeedCPUAdam as ds

    clip_rule = os.path.join(tempfile.mkdtemp(prefix="optc-peers-"), "clip_adamw.opt")
    with open(clip_rule, "w") as f:
        f.write(CLIP_ADAMW)

    rows = []

    def row(name, peer, rule, extra=()):
        # Peer and optc take turns, --rounds times each; medians of the rounds' medians.
        peer_ms, mine = [], []
        for _ in range(args.rounds):
            peer_ms.append(peer())
            mine.append(optc_bench(args.optc, rule, args, extra))
        peer_ms = statistics.median(peer_ms)
        ms = statistics.median(m[0] for m in mine)
        pattern = statistics.median(m[1] for m in mine)
        rule = os.path.basename(rule)
        rows.append((name, peer_ms, ms, pattern))
        print(f"{name:<44} {peer_ms:9.2f} ms   optc {rule:<10} {ms:9.2f} ms   "
              f"peer/optc {peer_ms / ms:5.2f}   optc/its pattern {pattern:5.3f}", flush=True)

    print(f"{n} f32 elements, {args.threads} threads, medians of {steps} steps; "
          f"torch {torch.__version__}, pytorch-optimizer {importlib.metadata.version('pytorch-optimizer')}, optc engine {args.engine}",
          flush=True)
    lr = 1e-3
    row("torch.optim.Adam(fused=True)",
        lambda: torch_case(torch, lambda ps: torch.optim.Adam(ps, lr=lr, fused=True), n, steps), "adam")
    row("torch.optim.AdamW(fused=True)",
        lambda: torch_case(torch, lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True), n, steps), "adamw")
    row("torch.optim.SGD(momentum=0.9, fused=True)",
        lambda: torch_case(torch, lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, fused=True), n, steps),
        "sgd", ["--set", "momentum=0.9"])
    if ds is not None:
        row("DeepSpeedCPUAdam(adamw_mode=False)",
            lambda: torch_case(torch, lambda ps: ds(ps, lr=lr, adamw_mode=False), n, steps), "adam")
        row("DeepSpeedCPUAdam(adamw_mode=True)",
            lambda: torch_case(torch, lambda ps: ds(ps, lr=lr, adamw_mode=True), n, steps), "adamw")
        row("DeepSpeedCPUAdam, bf16 params, f32 state",
            lambda: torch_case(torch, lambda ps: ds(ps, lr=lr, adamw_mode=False), n, steps,
                       dtype=torch.bfloat16),
            "adam", ["--storage", "bf16"])
    row("pytorch_optimizer.Adan",
        lambda: torch_case(torch, lambda ps: po.Adan(ps, lr=lr), n, steps), "adan")
    row("pytorch_optimizer.DiffGrad",
        lambda: torch_case(torch, lambda ps: po.DiffGrad(ps, lr=lr), n, steps), "diffgrad")
    row("pytorch_optimizer.Lion",
        lambda: torch_case(torch, lambda ps: po.Lion(ps, lr=1e-4), n, steps), "lion")
    row("clip_grad_norm_ + AdamW(fused=True)",
        lambda: torch_case(torch, lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True), n, steps, clip=1.0),
        clip_rule)
    print()
    print("| peer | peer ms | optc ms | peer / optc | optc / its access pattern |")
    print("|---|---|---|---|---|")
    for name, peer, mine, pattern in rows:
        print(f"| {name} | {peer:.1f} | {mine:.1f} | {peer / mine:.2f} | {pattern:.2f} |")


if __name__ == "__main__":
    main()
