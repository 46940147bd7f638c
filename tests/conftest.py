"""Shared fixtures, and the skip policy (tests/skips.py). The PostgreSQL server itself lives in tests/pg.py."""

import collections
import os

import pytest
import torch

from tests import pg, slurm_cluster
from tests.skips import is_cuda_only, skip_reason

# The tests' tensors are tiny and several processes (workers, servers) share 2 cores: OpenMP threads
# only spin against each other there (measured 30x slower per batch). Worker subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """In-process training on one torch thread: fast on two cores, deterministic for replay checks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the whole session (see tests/pg.py for the contract)."""
    try:
        server = pg.server_for_tests()
    except pg.PostgresUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.close()


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM cluster (munged, slurmctld, slurmd) for the session (see tests/slurm_cluster.py)."""
    try:
        cluster = slurm_cluster.SlurmCluster()
    except slurm_cluster.SlurmUnavailable as exc:
        pytest.skip(str(exc))
    yield cluster
    cluster.close()


# --- skips: counted at the end of every run; with --no-skips (CI) any but a CUDA-only one fails the run -----
_skipped: list[str] = []


def pytest_addoption(parser):
    parser.addoption("--no-skips", action="store_true",
                     help="fail the run when a test skips for any reason other than a missing CUDA device")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(skip_reason(report))


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--no-skips") and any(not is_cuda_only(r) for r in _skipped):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    cuda = sum(is_cuda_only(r) for r in _skipped)
    terminalreporter.write_line(f"skipped: {len(_skipped)} ({cuda} CUDA-only, {len(_skipped) - cuda} other)")
    for reason, n in sorted(collections.Counter(_skipped).items()):
        terminalreporter.write_line(f"  {n} x {reason}")
    if config.getoption("--no-skips") and len(_skipped) > cuda:
        terminalreporter.write_line("--no-skips: only CUDA-only skips are allowed; failing the run", red=True)
