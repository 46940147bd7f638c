"""Fixtures of the golden tests: every test runs once per implementation of the core."""

import pytest
import torch

from pcvit.config import IMPLEMENTATIONS

from .adapter import load_case


@pytest.fixture(scope="package", autouse=True)
def one_cpu_thread():
    """The golden cases are tiny (B = 4, H = 16): intra-op threads only add overhead, and on a busy machine
    (CI runners, parallel jobs) their spin-waiting made a block ~100x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def basic():
    """Case a: one full training batch with every intermediate (README 6.1). (arrays, meta)."""
    return load_case("train_step_basic")


@pytest.fixture(scope="session")
def warmup():
    """Case b: two batches from the run start with warm-up 5 > T (README 6.2)."""
    return load_case("train_step_warmup")


@pytest.fixture(scope="session")
def layernorm():
    """Case c: the state-LayerNorm variant (README 6.3)."""
    return load_case("train_step_layernorm")


@pytest.fixture(scope="session")
def probe():
    """Case d: probe features, positional encodings, unpatchify map (README 6.4)."""
    return load_case("probe_features")
