"""Rules with more inputs, stages, scalar and per-sample inputs, random draws; NumPy arrays."""

import numpy as np
import pytest
import torch

import optc


def test_n_harpg_stages_match_array_optimizer():
    """n_harpg's probe stage returns its outputs; the update takes the Hessian-vector
    product. The torch optimizer and the NumPy one give the same bits."""
    torch.manual_seed(3)
    shapes = [(4, 3), (7,)]
    ws = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    arrs = [w.detach().numpy().copy() for w in ws]
    opt = optc.Optimizer(ws, "n_harpg", eta0=0.05)
    aopt = optc.ArrayOptimizer(arrs, "n_harpg", eta0=0.05)
    for step in range(4):
        q = 0.25 + 0.1 * step
        outs = opt.run_stage("probe", inputs={"q": q})
        aouts = aopt.run_stage("probe", {"q": q})
        assert set(outs) == {"theta_hat", "u"}
        for t, a in zip(outs["theta_hat"], aouts["theta_hat"]):
            assert t.shape == a.shape
            assert np.array_equal(t.numpy(), a)
        g = [torch.randn(s) for s in shapes]
        hv = [torch.randn(s) for s in shapes]
        for w, gg in zip(ws, g):
            w.grad = gg
        opt.run_stage("update", inputs={"hv": hv, "q": q})
        aopt.run_stage("update", {"g": [x.numpy() for x in g], "hv": [x.numpy() for x in hv], "q": q})
    for w, a in zip(ws, arrs):
        assert np.array_equal(w.detach().numpy(), a)
    assert opt.steps == 4


def test_scalar_input_normalized_gd():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = optc.Optimizer([w], "normalized_gd")
    w.grad = torch.tensor([3.0, 4.0])
    with pytest.raises(optc.ConfigError, match="loss"):
        opt.step()
    opt.step(inputs={"loss": torch.tensor(2.0)})
    assert opt.steps == 1
    assert not torch.equal(w.detach(), torch.tensor([3.0, 4.0]))


def test_per_sample_inputs_dp_sgd_seeded():
    """dp_sgd takes per-sample gradients (samples, *shape); the same seed draws the same
    noise, another seed other noise."""
    def run(seed):
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 2))]
        opt = optc.Optimizer(ws, "dp_sgd", seed=seed, lr=0.1)
        G = [torch.randn(8, 5), torch.randn(8, 2, 2)]
        opt.step(inputs={"G": G})
        return [w.detach().clone() for w in ws]
    a, b, c = run(1), run(1), run(2)
    ws = [torch.nn.Parameter(torch.randn(5))]
    opt = optc.Optimizer(ws, "dp_sgd", seed=5)
    assert opt.seed == 5
    opt.seed = 9
    assert opt.seed == 9
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(optc.ConfigError, match="samples"):
        ws = [torch.nn.Parameter(torch.randn(5))]
        optc.Optimizer(ws, "dp_sgd").step(inputs={"G": [torch.randn(5)]})


def test_inline_rule_numpy():
    src = """
    rule heavy_ball(lr = 0.1, beta = 0.5) {
        param x
        input g
        state v = 0
        v = beta * v + g
        x = x - lr * v
    }
    """
    x = np.ones(4, np.float64)
    opt = optc.ArrayOptimizer([x], src, beta=0.5)
    for _ in range(2):
        opt.step({"g": [np.ones(4)]})
    # v1 = 1, x1 = 0.9; v2 = 1.5, x2 = 0.75
    assert np.array_equal(x, np.full(4, 0.75))
    assert np.array_equal(opt.state("v")[0], np.full(4, 1.5))
    with pytest.raises(optc.ConfigError, match="read-only"):
        y = np.ones(3)
        y.flags.writeable = False
        optc.ArrayOptimizer([y], "sgd")


def test_two_params_rule_with_space_groups():
    """penalty_bilevel has params x, y, z: param groups name their `space`."""
    r = optc.rule("penalty_bilevel")
    assert r.spaces == ["x", "y", "z"]
    xs = [torch.nn.Parameter(torch.randn(3))]
    ys = [torch.nn.Parameter(torch.randn(2))]
    zs = [torch.nn.Parameter(torch.randn(2))]
    opt = optc.Optimizer([{"params": xs, "space": "x"}, {"params": ys, "space": "y"},
                          {"params": zs, "space": "z"}], r)
    ins = {"fx": [torch.randn(3)], "gx_y": [torch.randn(3)], "gx_z": [torch.randn(3)],
           "fy": [torch.randn(2)], "gy": [torch.randn(2)], "gz": [torch.randn(2)]}
    before = xs[0].detach().clone()
    opt.step(inputs=ins)
    assert not torch.equal(before, xs[0].detach())
    with pytest.raises(optc.ConfigError, match="no param `w`"):
        optc.Optimizer([{"params": xs, "space": "w"}], r)


def test_compile_and_rule_interface():
    r = optc.compile(optc.stdlib_source("adam"))
    assert r.name == "adam"
    names = [h[0] for h in r.hypers]
    assert names[:3] == ["lr", "beta1", "beta2"]
    assert ("g", "input", 0, False) in r.buffers
    assert r.stages == ["step"]
    assert "adamw" in optc.stdlib_names()
    with pytest.raises(optc.ConfigError):
        optc.compile("rule a() { param w\n input g\n w = g }\nrule b() { param w\n input g\n w = g }")


def test_rule_from_a_file_and_torch_switches(tmp_path):
    path = tmp_path / "halve.opt"
    path.write_text("rule halve(lr = 0.5) {\n  param w\n  input g\n  w = w - lr * g\n}\n")
    for spec in (path, str(path)):
        w = torch.nn.Parameter(torch.ones(2))
        opt = optc.Optimizer([w], spec, lr=0.25, foreach=False, fused=None)
        w.grad = torch.ones(2)
        opt.step()
        assert torch.equal(w.detach(), torch.full((2,), 0.75))
    assert optc.rule(path).name == "halve"
    with pytest.raises(FileNotFoundError):
        optc.rule(tmp_path / "missing.opt")
