"""Shared fixtures. The PostgreSQL server itself lives in tests/pg.py."""

import os

import pytest
import torch

from tests import pg

# The tests' tensors are tiny and several processes (workers, servers) share 2 cores: OpenMP threads
# only spin against each other there (measured 30x slower per batch). Worker subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the whole session (see tests/pg.py for the contract)."""
    try:
        server = pg.server_for_tests()
    except pg.PostgresUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.close()
