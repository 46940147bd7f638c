"""Fixtures of the golden tests: every test runs once per implementation of the core.

A golden test never skips silently: a skip here is turned into a failure, unless it is a CUDA-only skip
(a reason that names CUDA, for checks that need a GPU), since a skipped oracle proves nothing.
"""

import pytest

from pcvit.config import IMPLEMENTATIONS

from tests.skips import is_cuda_only, skip_reason

from .adapter import load_case


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not is_cuda_only(reason):
            report.outcome = "failed"
            report.longrepr = f"a golden test must not skip (only CUDA-only skips may): {reason}"


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
