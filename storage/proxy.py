"""Optuna's gRPC storage proxy: many workers on one PostgreSQL server through a few connections.

    grpc://HOST:PORT     the storage URL of a worker, `pcvit-launch` or `pcvit-study report` behind a proxy

A worker holds up to 3 PostgreSQL connections (storage.postgres), so a server with max_connections=100
takes about 30 workers. The proxy (`pcvit-study proxy`, which runs `optuna.storages.run_grpc_proxy_server`)
holds a fixed pool of connections and serves any number of workers over gRPC. What the proxy cannot carry
(Optuna's heartbeat table, row locks, advisory locks) the runner does beside it, in the proxy's own process,
with direct database access: see `studies.running.proxy_reaper`.
"""

from __future__ import annotations

import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import optuna

from storage.optuna_access import proxy_client_class
from storage.postgres import StorageError, StorageUnreachable

SCHEME = "grpc://"
CONNECT_TIMEOUT_S = 5  # how long one attempt waits for the proxy to answer
RECONNECT_BACKOFF_MS = 2000  # gRPC's default grows to 120 s: a restarted proxy would sit unused for minutes
_ADDRESS = re.compile(r"grpc://(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})/?")


def is_proxy_url(url: str | None) -> bool:
    return bool(url) and url.startswith(SCHEME)


def proxy_address(url: str) -> tuple[str, int]:
    """`grpc://HOST:PORT` -> (HOST, PORT); StorageError naming the URL otherwise."""
    match = _ADDRESS.fullmatch(url)
    if not match or not 0 < int(match["port"]) < 65536:
        raise StorageError(f"{url}: a storage proxy URL is grpc://HOST:PORT (e.g. grpc://db-host:13000)")
    return match["host"].strip("[]"), int(match["port"])


def open_proxy(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> optuna.storages.BaseStorage:
    """The storage behind the proxy at `url`; StorageUnreachable (one line, naming the address) if none answers."""
    host, port = proxy_address(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            client = proxy_client_class(RECONNECT_BACKOFF_MS)(host=host, port=port)
    except ImportError as exc:
        raise StorageError(f"{url}: the storage proxy needs grpcio (pip install grpcio): {exc}") from None
    try:
        client.wait_server_ready(timeout=timeout_s)
    except ConnectionError:
        client.close()
        raise StorageUnreachable(f"{url}: no storage proxy answers at {host}:{port} (waited {timeout_s:g} s; "
                                 "start one with `pcvit-study proxy`)") from None
    return client


def serve(backend: optuna.storages.BaseStorage, host: str, port: int, threads: int) -> None:
    """Serve `backend` (an RDBStorage) on HOST:PORT until the process ends; Optuna's server, `threads` handlers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.run_grpc_proxy_server(optuna.storages.get_storage(backend), host=host, port=port,
                                              thread_pool=ThreadPoolExecutor(max_workers=threads))
