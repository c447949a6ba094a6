"""The CUDA path: device addresses through the CUDA engine's step_device. Run on a GPU where
torch sees one; everywhere, the same binding code path runs on the CUDA emulator (the generated
CUDA kernels built for the CPU, device memory being host memory)."""

import pytest
import torch

import optc
from conftest import assert_close


def trajectory(engine, device="cpu", rule="adamw", steps=6, **hyper):
    g = torch.Generator().manual_seed(7)
    shapes = [(1,), (31,), (7, 9), (129,), (256, 4)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    ps = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    opt = optc.Optimizer(ps, rule, engine=engine, **hyper)
    for step in range(steps):
        for p, gg in zip(ps, grads[step]):
            p.grad = gg.to(device)
        opt.step()
    return [p.detach().cpu() for p in ps], opt


@pytest.mark.parametrize("rule,hyper", [("adamw", {"lr": 0.01, "amsgrad": True}),
                                        ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                                        ("lamb", {"lr": 0.01, "weight_decay": 0.05})])
def test_cuda_emulator_path_matches_cpu(rule, hyper):
    try:
        got, opt = trajectory("cuda-emulator", rule=rule, **hyper)
    except optc.EngineError as e:
        pytest.skip(f"the CUDA emulator cannot build here: {e}")
    assert opt.engine == "cuda-emulator"
    want, _ = trajectory("interpreter", rule=rule, **hyper)
    for a, b in zip(got, want):
        assert_close(a, b, f"{rule} on the CUDA emulator", rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
def test_cuda_tensors_match_cpu():
    got, opt = trajectory("auto", device="cuda", lr=0.01)
    assert opt.engine.startswith("cuda")
    want, _ = trajectory("interpreter", lr=0.01)
    for a, b in zip(got, want):
        assert_close(a, b, "adamw on the GPU", rtol=1e-6, atol=1e-7)


def test_cuda_engine_without_a_gpu_is_an_engine_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(optc.EngineError):
        trajectory("cuda")
