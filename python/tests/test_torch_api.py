"""optc.Optimizer as a torch.optim.Optimizer: param groups, LR schedulers, state_dict round
trips, hyperparameter changes, version counters, 16-bit params."""

import io

import pytest
import torch

import optc
from conftest import assert_close


def params(seed=0, shapes=((7, 3), (131,), (1,), (16, 16))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def grads(ps, step, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * (0.1 + step % 3)


def groups_of(ps, **extra):
    return [{"params": ps[:2], "lr": 0.02, "weight_decay": 0.1, **extra},
            {"params": ps[2:], "lr": 0.005, "betas": (0.8, 0.95)}]


def test_param_groups_match_torch():
    a, b = params(), params()
    ours = optc.Optimizer(groups_of(a), "adamw", lr=0.01, weight_decay=0.01)
    ref = torch.optim.AdamW(groups_of(b), lr=0.01, weight_decay=0.01, foreach=False)
    assert ours.param_groups[1]["beta1"] == 0.8 and ours.param_groups[1]["weight_decay"] == 0.01
    for step in range(25):
        grads(a, step)
        grads(b, step)
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        assert_close(x, y, "adamw with two groups")


def test_hyperparameter_change_takes_effect_next_step():
    a, b = params(), params()
    ours = optc.Optimizer(a, "sgd", lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(b, lr=0.1, momentum=0.9, foreach=False)
    for step in range(10):
        if step == 4:
            for g in ours.param_groups:
                g["lr"] = 0.03
                g["momentum"] = 0.5
            for g in ref.param_groups:
                g["lr"] = 0.03
                g["momentum"] = 0.5
        grads(a, step)
        grads(b, step)
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        assert_close(x, y, "sgd after changing lr and momentum")


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20,
                                                              cycle_momentum=False),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_lr_schedulers(kind):
    a, b = params(), params()
    ours = optc.Optimizer(groups_of(a), "adam", lr=0.01)
    ref = torch.optim.Adam(groups_of(b), lr=0.01, foreach=False)
    s_ours, s_ref = SCHEDULERS[kind](ours), SCHEDULERS[kind](ref)
    lrs = []
    for step in range(20):
        grads(a, step)
        grads(b, step)
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
        lrs.append(ours.param_groups[0]["lr"])
    assert len(set(lrs)) > 2, "the schedule changed the learning rate"
    for x, y in zip(a, b):
        assert_close(x, y, f"adam under {kind}")


@pytest.mark.parametrize("rule,hyper", [
    ("adamw", {"lr": 0.01, "amsgrad": True}),
    ("lamb", {"lr": 0.01, "weight_decay": 0.05}),
    ("adagrad_norm", {}),
    ("adan", {"lr": 0.01, "max_grad_norm": 1.0}),
])
def test_state_dict_round_trip_continues_identically(rule, hyper):
    a = params()
    whole = optc.Optimizer(a, rule, **hyper)
    for step in range(12):
        grads(a, step)
        whole.step()

    b = params()
    first = optc.Optimizer(b, rule, **hyper)
    for step in range(6):
        grads(b, step)
        first.step()
    sd = first.state_dict()
    assert sd["state"][0]["step"].item() == 6.0
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    # through torch.save / torch.load, as a training script would
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    second = optc.Optimizer(c, rule)  # other hyperparameters: the state dict brings them
    second.load_state_dict(sd)
    assert second.param_groups[0]["lr"] == first.param_groups[0]["lr"]
    for step in range(6, 12):
        grads(c, step)
        second.step()
    for x, y in zip(c, a):
        assert torch.equal(x, y), "resumed run differs from the one that never stopped"


def test_state_dict_layout():
    a = params()
    opt = optc.Optimizer(a, "adam", lr=0.01)
    assert opt.state_dict()["state"] == {}
    grads(a, 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"]) == {0, 1, 2, 3}
    assert set(sd["state"][1]) == {"step", "m", "v", "vmax"}
    assert sd["state"][1]["m"].shape == a[1].shape
    # m after one step: (1 - beta1) * g
    assert_close(sd["state"][1]["m"], 0.1 * a[1].grad, "first moment")
    assert sd["optc"]["rule"] == "adam"


def test_load_state_dict_of_another_rule_changes_nothing():
    a = params()
    opt = optc.Optimizer(a, "adam", lr=0.01)
    grads(a, 0)
    opt.step()
    other = optc.Optimizer(params(), "adamw")
    grads(other.param_groups[0]["params"], 0)
    other.step()
    before = opt.state_dict()
    with pytest.raises(optc.CheckpointError):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["optc"]["checkpoint"] == before["optc"]["checkpoint"]
    assert after["param_groups"] == before["param_groups"]


def test_step_bumps_version_counter_and_keeps_storage():
    a = params()
    opt = optc.Optimizer(a, "sgd", lr=0.1)
    versions = [p._version for p in a]
    ptrs = [p.data_ptr() for p in a]
    grads(a, 0)
    opt.step()
    assert all(p._version > v for p, v in zip(a, versions))
    assert [p.data_ptr() for p in a] == ptrs


def test_autograd_sees_the_write():
    w = torch.nn.Parameter(torch.ones(3))
    opt = optc.Optimizer([w], "sgd", lr=0.5)
    y = (w * w).sum()  # saves w for backward
    y.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_closure_returns_loss():
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = optc.Optimizer([w], "sgd", lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert loss.item() == 4.0
    assert w.item() == 1.0  # 2 - 0.25 * 4


def test_bf16_params_follow_f32_reference():
    """bf16 params, f32 state, arithmetic in f32, rounded to nearest on store: within the
    rounding of bf16 (2^-8 relative) per step of the f32 trajectory."""
    ref32 = params()
    ours16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in ref32]
    ref32 = [torch.nn.Parameter(p.detach().to(torch.bfloat16).float()) for p in ref32]
    opt = optc.Optimizer(ours16, "adamw", lr=0.01, master_weights=True)
    ref = torch.optim.AdamW(ref32, lr=0.01, foreach=False)
    for step in range(20):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours16, ref32):
            gg = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            p.grad = gg
            q.grad = gg.float()
        opt.step()
        ref.step()
    for p, q in zip(ours16, ref32):
        assert p.dtype == torch.bfloat16
        # with master weights the bf16 params are the f32 masters rounded to nearest
        assert_close(p.float(), q, "bf16 adamw with master weights", rtol=2 ** -8, atol=1e-6)
    master = opt.state_of("theta.master")
    for m, q in zip(master, ref32):
        # the master weights follow the f32 trajectory up to bf16 gradient inputs (the same
        # here) and f32 rounding
        assert_close(m, q, "master weights", rtol=1e-5, atol=1e-6)


def test_bf16_without_master_weights_rounds_each_step():
    ps = [torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))]
    before = ps[0].detach().clone()
    opt = optc.Optimizer(ps, "sgd", lr=0.1)
    ps[0].grad = torch.ones(100, dtype=torch.bfloat16)
    opt.step()
    want = (before.float() - 0.1).to(torch.bfloat16)
    assert torch.equal(ps[0].detach(), want)


def test_float64_and_float16():
    for dtype in (torch.float64, torch.float16):
        w = torch.nn.Parameter(torch.ones(5, dtype=dtype))
        opt = optc.Optimizer([w], "sgd", lr=0.5)
        w.grad = torch.full((5,), 0.5, dtype=dtype)
        opt.step()
        assert w.dtype == dtype
        assert torch.equal(w.detach(), torch.full((5,), 0.75, dtype=dtype))


def test_add_param_group_before_first_step():
    a = params()
    opt = optc.Optimizer(a[:2], "sgd", lr=0.1)
    opt.add_param_group({"params": a[2:], "lr": 0.0})
    before = [p.detach().clone() for p in a]
    grads(a, 0)
    opt.step()
    assert not torch.equal(a[0], before[0])
    assert torch.equal(a[3], before[3])  # lr 0 in the second group
    with pytest.raises(optc.ConfigError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})


def test_pickling_says_to_use_state_dict():
    import copy
    import pickle
    opt = optc.Optimizer(params(), "adam")
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(opt)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


def test_frozen_parameters_are_left_out_as_in_torch():
    torch.manual_seed(0)
    a = params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for ps in (a, b):
        ps[1].requires_grad_(False)
    ours = optc.Optimizer(a, "adamw", lr=0.01)
    ref = torch.optim.AdamW(b, lr=0.01, foreach=False)
    frozen = a[1].detach().clone()
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(a, b):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert torch.equal(a[1].detach(), frozen)
    for x, y in zip(a, b):
        assert_close(x, y, "adamw with a frozen parameter")
    sd = ours.state_dict()
    assert set(sd["state"]) == {0, 2, 3}  # no state for the frozen one, as torch
    assert set(ref.state_dict()["state"]) == {0, 2, 3}
    a[1].requires_grad_(True)
    a[1].grad = torch.ones_like(a[1])
    with pytest.raises(optc.ConfigError, match="unfreezing"):
        ours.step()
    # every parameter frozen: steps do nothing
    c = [torch.nn.Parameter(torch.ones(2), requires_grad=False)]
    only_frozen = optc.Optimizer(c, "adam")
    only_frozen.step()
    assert only_frozen.steps == 0 and torch.equal(c[0].detach(), torch.ones(2))
    # a plain tensor (not an nn.Parameter) is stepped with gradients given by name
    w = torch.ones(2)
    manual = optc.Optimizer([w], "sgd", lr=0.5)
    manual.step(inputs={"g": [torch.ones(2)]})
    assert torch.equal(w, torch.full((2,), 0.5))


def test_zeroth_order_rules_keep_parameters_without_requires_grad():
    """spsa has no gradient input: its parameters need no requires_grad."""
    w = torch.zeros(4)  # a plain tensor
    opt = optc.Optimizer([w], "spsa", lr=0.1, eps=0.01)
    opt.run_stage("plus")
    assert not torch.equal(w, torch.zeros(4))
