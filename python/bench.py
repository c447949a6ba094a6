"""Step time of optc's adamw through the Python binding (dispatch included) against torch's
fused AdamW, in the same process, for several tensor counts of the same total size.

    python python/bench.py [--rounds 5] [--steps 20] [--threads N]

Each row takes turns: optc, torch, optc, torch, ... (`--rounds` times `--steps` steps each)
and reports the median step time of each; a ratio above 1 means optc is faster.
"""

import argparse
import statistics
import time

import torch

import optc

CONFIGS = [(10, 1_000_000), (1_000, 10_000), (10_000, 1_000)]


def timed(opt, steps):
    opt.step()  # warm
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"adamw step, {args.threads} threads, median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'tensors x elements':<22}{'optc ms':>10}{'torch fused ms':>16}{'torch / optc':>14}")
    for count, n in CONFIGS:
        ps_a = [torch.nn.Parameter(torch.randn(n)) for _ in range(count)]
        ps_b = [torch.nn.Parameter(p.detach().clone()) for p in ps_a]
        for a, b in zip(ps_a, ps_b):
            a.grad = torch.randn(n) * 1e-3
            b.grad = a.grad.clone()
        ours = optc.Optimizer(ps_a, "adamw", lr=1e-3, engine=args.engine, threads=args.threads)
        ref = torch.optim.AdamW(ps_b, lr=1e-3, fused=True)
        t_ours, t_ref = [], []
        for _ in range(args.rounds):
            t_ours.append(timed(ours, args.steps))
            t_ref.append(timed(ref, args.steps))
        a, b = statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3
        print(f"{f'{count} x {n}':<22}{a:>10.3f}{b:>16.3f}{b / a:>14.2f}")


if __name__ == "__main__":
    main()
