"""Every standard-library rule with a torch.optim or pytorch-optimizer counterpart, stepped side
by side with it in one process, on the cases of scripts/parity (nondefault hyperparameters
included), 30 steps, within the Rust parity tests' tolerances."""

import numpy as np
import pytest
import torch
import zlib

import optc
from conftest import assert_close, load_fixture_maker

MF = load_fixture_maker()
CASES = [c for c in MF.CASES if c[1] in MF.RULES]


def run_case(name, key, hyper, dtype, engine="auto", steps=30):
    rule = key.split(".")[0]
    hyper = {**MF.REFERENCE_SETTINGS.get(rule, {}), **hyper}
    rng = np.random.default_rng(zlib.crc32(name.encode()) ^ 0x5EED)
    init = {k: rng.standard_normal(s) for k, s in MF.SHAPES.items()}
    ours = [torch.nn.Parameter(torch.tensor(v, dtype=dtype)) for v in init.values()]
    refs = [torch.nn.Parameter(torch.tensor(v, dtype=dtype)) for v in init.values()]
    cls, _ = MF.reference(key)
    ref = cls(refs, **MF.ctor_kwargs(key, hyper))
    opt = optc.Optimizer(ours, rule, engine=engine, **hyper)
    for step in range(steps):
        scale = float(np.exp(rng.uniform(np.log(0.1), np.log(3.0))))
        for a, b in zip(ours, refs):
            g = torch.tensor(rng.standard_normal(tuple(a.shape)) * scale, dtype=dtype)
            a.grad = g.clone()
            b.grad = g.clone()
        opt.step()
        ref.step()
        for j, (a, b) in enumerate(zip(ours, refs)):
            assert_close(a, b, f"{name}: tensor {j} at step {step + 1}")
    return opt


@pytest.mark.parametrize("name,key,hyper", CASES, ids=[c[0] for c in CASES])
def test_parity_f32(name, key, hyper):
    run_case(name, key, hyper, torch.float32)


F64 = [c for c in CASES if c[0] in ("adam_amsgrad_wd", "adamw_amsgrad_maximize", "sgd_nesterov_wd_maximize",
                                    "rmsprop_centered_momentum_wd", "lamb_coupled_wd_prenorm",
                                    "adan_clip_prox_wd", "nadam_wd_momentum_decay")]


@pytest.mark.parametrize("name,key,hyper", F64, ids=[c[0] for c in F64])
def test_parity_f64(name, key, hyper):
    run_case(name, key, hyper, torch.float64)


def test_every_counterpart_is_covered():
    rules = {c[1] for c in CASES}
    # every rule the parity script has a torch.optim / pytorch-optimizer reference for
    assert rules == set(MF.RULES), set(MF.RULES) - rules
    assert rules <= {*optc.stdlib_names(), "amsgrad"}


@pytest.mark.parametrize("engine", ["interpreter", "cranelift", "native"])
def test_engines_agree_bit_for_bit(engine):
    """The engines give the same bits through the Python binding."""
    def trajectory(eng):
        torch.manual_seed(1)
        ps = [torch.randn(n, requires_grad=True) for n in (0, 1, 15, 17, 129, 1000)]
        opt = optc.Optimizer(ps, "lamb", engine=eng, lr=0.01, weight_decay=0.05, rectify=True)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach().clone() for p in ps]
    try:
        got = trajectory(engine)
    except optc.EngineError as e:
        pytest.skip(f"engine {engine} is not available here: {e}")
    want = trajectory("interpreter")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_reference_names_are_aliases():
    """pytorch_optimizer.Adan's `weight_decouple` is the rule's `no_prox`."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(9))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    ours = optc.Optimizer(a, "adan", lr=0.01, weight_decay=0.05, weight_decouple=True)
    assert ours.param_groups[0]["no_prox"] is True
    ref = MF.po.Adan(b, lr=0.01, weight_decay=0.05, weight_decouple=True)
    for _ in range(10):
        g = torch.randn(9)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert_close(a[0], b[0], "adan with weight_decouple")
    with pytest.raises(optc.ConfigError, match="same hyperparameter"):
        optc.Optimizer(a, "adan", weight_decouple=True, no_prox=False)
