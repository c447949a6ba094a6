"""Every error class, and that a failing call changes no parameter and no state."""

import os

import pytest
import torch

import optc


def setup(rule="adam", n=3, **hyper):
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(n)]
    opt = optc.Optimizer(ps, rule, **hyper)
    for p in ps:
        p.grad = torch.randn(5)
    opt.step()
    for p in ps:
        p.grad = torch.randn(5)
    return ps, opt


def snapshot(ps, opt):
    return [p.detach().clone() for p in ps], opt.state_dict()["optc"].get("checkpoint"), opt.steps


def assert_unchanged(ps, opt, snap):
    values, blob, steps = snap
    for p, v in zip(ps, values):
        assert torch.equal(p.detach(), v)
    assert opt.state_dict()["optc"].get("checkpoint") == blob
    assert opt.steps == steps


def test_rule_error_carries_report_code_and_span():
    src = "rule r(lr = 0.1) {\n  param theta\n  input g\n  theta = theta - lr * gg\n}\n"
    with pytest.raises(optc.RuleError) as e:
        optc.compile(src, "r.opt")
    err = e.value
    assert isinstance(err, ValueError)
    assert err.code.startswith("E")
    start, end = err.span
    assert src[start:end] == "gg"
    assert "r.opt:4:" in err.report and "gg" in err.report
    assert err.diagnostics[0].severity == "error"


def test_rule_error_from_optimizer():
    with pytest.raises(optc.RuleError):
        optc.Optimizer([torch.nn.Parameter(torch.ones(1))], "rule r() { param t }")


def test_unknown_rule_and_hyperparameter():
    w = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(optc.ConfigError, match="neither a standard-library rule"):
        optc.Optimizer(w, "no_such_rule")
    with pytest.raises(optc.ConfigError, match="no hyperparameter `lrr`"):
        optc.Optimizer(w, "adam", lrr=0.1)
    with pytest.raises(optc.ConfigError, match="no hyperparameter `momentun`"):
        optc.Optimizer([{"params": w, "momentun": 0.9}], "sgd")


def test_out_of_range_hyperparameter_leaves_everything():
    ps, opt = setup()
    snap = snapshot(ps, opt)
    opt.param_groups[0]["beta1"] = 1.5
    with pytest.raises(optc.ConfigError, match="out of range"):
        opt.step()
    assert_unchanged(ps, opt, snap)
    opt.param_groups[0]["beta1"] = 0.9
    opt.step()
    assert opt.steps == 2


def test_bad_gradients_leave_everything():
    ps, opt = setup()
    snap = snapshot(ps, opt)
    good = [p.grad for p in ps]
    # torch itself refuses a gradient of another dtype or shape in .grad; a non-contiguous one
    # it accepts
    ps[1].grad = torch.randn(10)[::2]
    with pytest.raises(optc.ConfigError, match="contiguous"):
        opt.step()
    assert_unchanged(ps, opt, snap)
    for bad, match in [(torch.randn(5, dtype=torch.float64), "float64"), (torch.randn(6), "shape")]:
        with pytest.raises(optc.ConfigError, match=match):
            opt.step(inputs={"g": [good[0], bad, good[2]]})
        assert_unchanged(ps, opt, snap)
    ps[1].grad = None
    with pytest.raises(optc.ConfigError, match="no gradient"):
        opt.step()
    assert_unchanged(ps, opt, snap)
    for p, g in zip(ps, good):
        p.grad = g


def test_input_aliasing_a_parameter_is_refused():
    ps, opt = setup("sgd", lr=0.1)
    snap = snapshot(ps, opt)
    ps[0].grad = ps[0].data  # the gradient is the parameter itself
    with pytest.raises(optc.ConfigError, match="shares memory"):
        opt.step()
    assert_unchanged(ps, opt, snap)


def test_parameters_sharing_memory_are_refused():
    base = torch.randn(10)
    a = torch.nn.Parameter(base[:6])
    b = torch.nn.Parameter(base[4:])
    opt = optc.Optimizer([a, b], "sgd")
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    with pytest.raises(optc.ConfigError, match="share memory"):
        opt.step()
    assert torch.equal(base, base.clone())


def test_mixed_dtypes_and_non_contiguous_params():
    with pytest.raises(optc.ConfigError, match="different dtypes"):
        optc.Optimizer([torch.nn.Parameter(torch.ones(2)),
                        torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], "sgd")
    with pytest.raises(optc.ConfigError, match="not contiguous"):
        optc.Optimizer([torch.nn.Parameter(torch.ones(4, 4).t())], "sgd")
    with pytest.raises(optc.ConfigError, match="not supported"):
        optc.Optimizer([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))], "sgd")


def test_non_finite_error_leaves_everything():
    ps, opt = setup(non_finite="error")
    snap = snapshot(ps, opt)
    ps[2].grad[3] = float("nan")
    with pytest.raises(optc.NonFiniteError) as e:
        opt.step()
    assert isinstance(e.value, RuntimeError)
    assert_unchanged(ps, opt, snap)


def test_non_finite_skip_counts():
    ps, opt = setup(non_finite="skip")
    snap = snapshot(ps, opt)
    ps[0].grad[0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    assert_unchanged(ps, opt, snap)


def test_unknown_input_and_stage_order():
    ps, opt = setup()
    snap = snapshot(ps, opt)
    with pytest.raises(optc.ConfigError, match="no input `loss`"):
        opt.step(inputs={"loss": 1.0})
    assert_unchanged(ps, opt, snap)
    w = [torch.nn.Parameter(torch.randn(4))]
    n = optc.Optimizer(w, "n_pg_igt")
    w[0].grad = torch.randn(4)
    with pytest.raises(optc.ConfigError, match="out of order"):
        n.run_stage("update")
    with pytest.raises(optc.ConfigError, match="no stage `nope`"):
        n.run_stage("nope")


def test_engine_errors_are_config_or_engine_errors():
    w = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(optc.ConfigError, match="unknown engine"):
        optc.Optimizer(w, "sgd", engine="gpu9").step()
    # the native engine without a working C compiler (in a fresh process: the compiler a
    # process found is kept)
    import subprocess
    import sys
    code = ("import torch, optc\n"
            "try:\n"
            "    optc.Optimizer([torch.nn.Parameter(torch.ones(2))], 'sgd', engine='native')\n"
            "except optc.EngineError as e:\n"
            "    print('EngineError:', e)\n")
    env = {**os.environ, "OPTC_CC": "/nonexistent/cc"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "EngineError: native backend: no working C compiler" in out.stdout, out.stderr
    if not torch.cuda.is_available():
        with pytest.raises(optc.EngineError, match="CUDA driver"):
            optc.Optimizer(w, "sgd", engine="cuda")
    assert issubclass(optc.EngineError, RuntimeError)
    assert issubclass(optc.ConfigError, ValueError)
    assert issubclass(optc.CheckpointError, ValueError)
    assert all(issubclass(c, optc.OptcError) for c in (
        optc.RuleError, optc.ConfigError, optc.CheckpointError, optc.NonFiniteError, optc.EngineError))


def test_step_without_any_gradient_does_nothing_as_in_torch():
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    opt = optc.Optimizer(ps, "adam")
    before = [p.detach().clone() for p in ps]
    versions = [p._version for p in ps]
    opt.step()
    assert opt.steps == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert [p._version for p in ps] == versions
    ps[0].grad = torch.ones(5)  # one has a gradient, the other not: an error
    with pytest.raises(optc.ConfigError, match="no gradient"):
        opt.step()
