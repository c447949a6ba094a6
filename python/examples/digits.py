"""Train a small network on scikit-learn's bundled digits (8x8 images, 10 classes) with a rule
written right here — AdaBound (Luo et al., 2019: Adam whose per-element step size is clipped
into bounds that close in on SGD's) — against torch.optim.Adam and torch.optim.SGD.

    python python/examples/digits.py [--epochs 15] [--engine auto]
"""

import argparse
import time

import torch
from sklearn.datasets import load_digits

import optc

ADABOUND = """
/// AdaBound (Luo, Xiong, Liu & Sun, 2019): Adam's step size, clipped per element into
/// [lower(t), upper(t)], bounds that both tend to final_lr.
rule adabound(lr = 1e-3, final_lr = 0.1, gamma = 1e-3, beta1 = 0.9 in [0, 1),
              beta2 = 0.999 in [0, 1), eps = 1e-8) {
    param theta
    input g
    state m = 0, v = 0
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    let step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    let lower = final_lr * (1 - 1 / (gamma * t + 1))
    let upper = final_lr * (1 + 1 / (gamma * t))
    theta = theta - clamp(step_size / (sqrt(v) + eps), lower, upper) * m
}
"""


def data():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    return (x[:n], y[:n]), (x[n:], y[n:])


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(name, make_opt, epochs, train_set, test_set):
    net = model()
    opt = make_opt(net.parameters())
    (x, y), (xt, yt) = train_set, test_set
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    secs = time.perf_counter() - start
    print(f"{name:<28} " + " ".join(f"{l:.3f}" for l in losses) + f"   test accuracy {acc:.3f}  ({secs:.1f} s)")
    return losses, acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    train_set, test_set = data()
    rule = optc.compile(ADABOUND, "adabound.opt")
    print(f"digits: {len(train_set[0])} training and {len(test_set[0])} test images; "
          f"training loss per epoch, then test accuracy")
    runs = {
        "optc adabound (inline rule)": lambda p: optc.Optimizer(p, rule, engine=args.engine, lr=1e-3, final_lr=0.1),
        "optc adamw (stdlib)": lambda p: optc.Optimizer(p, "adamw", engine=args.engine, lr=1e-3),
        "torch.optim.AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "torch.optim.SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    }
    results = {name: train(name, make, args.epochs, train_set, test_set) for name, make in runs.items()}
    ours, ref = results["optc adamw (stdlib)"][0], results["torch.optim.AdamW"][0]
    drift = max(abs(a - b) / b for a, b in zip(ours, ref))
    print(f"optc adamw vs torch.optim.AdamW: largest relative difference of the epoch losses {drift:.2e}")


if __name__ == "__main__":
    main()
