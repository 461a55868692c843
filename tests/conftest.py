"""Shared fixtures: small deterministic models that need no download."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*pkg_resources.*")


class EpsNet:
    """A fixed smooth noise-prediction network on (B, D) inputs: eps(x, t) = tanh(x W + t / 1000)."""

    def __init__(self, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / 3

    def __call__(self, x: torch.Tensor, t, **_: object) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim:
            t = t.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x @ self.w.to(x.dtype) + t / 1000.0)


@pytest.fixture
def eps_net() -> EpsNet:
    return EpsNet()


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (and the batch rows it saw)."""

    def __init__(self, inner):
        self.inner = inner
        self.schedule = getattr(inner, "schedule", None)
        self.calls = 0
        self.times: list[float] = []

    def __call__(self, x, t, **kw):
        self.calls += 1
        self.times.extend(t.flatten().tolist() if isinstance(t, torch.Tensor) else [float(t)])  # per-sample times: all
        return self.inner(x, t, **kw)


@pytest.fixture(scope="session")
def digits_mixture():
    from fewstep.models import GaussianMixture

    return GaussianMixture.digits()


@pytest.fixture(scope="session")
def ddpm_schedule():
    from fewstep.eval.exact import default_schedule

    return default_schedule()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread (restored after): tiny tensors gain nothing from more, and on a
    shared CPU OpenMP's waiting threads make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
