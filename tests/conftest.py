import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tanh_mlp(sizes, seed=0):
    """A random tanh MLP in float64 with non-trivial weights (std 1/√fan_in, biases included)."""
    from flows.data import mlp

    return mlp(sizes, seed=seed)
