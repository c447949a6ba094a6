"""Shared helpers of the optc Python tests."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The tolerances of the Rust parity tests (tests/parity.rs): |ours - ref| <= RTOL |ref| + ATOL.
RTOL = 1e-5
ATOL = 1e-6


def load_fixture_maker():
    """scripts/parity/make_fixtures.py as a module: its CASES, reference classes and the
    mapping of optc hyperparameters to the references' constructor arguments."""
    path = os.path.join(ROOT, "scripts", "parity", "make_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_close(ours, ref, what, rtol=RTOL, atol=ATOL):
    ours = ours.detach().double()
    ref = ref.detach().double()
    err = (ours - ref).abs()
    bound = rtol * ref.abs() + atol
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: worst error is {worst:.3g} x the tolerance (max |err| {err.max().item():.3g})"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
