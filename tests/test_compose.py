"""docker-compose.yml's contract, checked without a Docker engine (there is none here).

The file is parsed with PyYAML; what it promises is checked against the real parts where they can
run here: the creator's and the dashboard's commands are run against a real PostgreSQL server that
requires a password, with the environment compose would give them; the worker's command goes
through the worker's own argument parser; environment names are matched against the code.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from studies.running import launch
from tests import pg
from tests.helpers import REPO

BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = sorted(name for name in SERVICES if name.startswith("worker-"))
OURS = ["create-study", "fetch-data", "dashboard", *WORKERS]  # services that run this project's image
READ_BY_OTHERS = {  # environment variables read by a library, not by our code
    "PGPASSWORD": "libpq (psycopg2) takes the password from it when the URL has none",
    "WANDB_API_KEY": "wandb logs in with it; runs are offline without it",
}
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ substitution, for the tests."""
    def substitute(match: re.Match) -> str:
        name, op, arg = match.groups()
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg or ""
    return _VAR.sub(substitute, value).replace("$$", "$")


def service_env(name: str, env: dict[str, str]) -> dict[str, str]:
    return {key: interpolate(str(value), env) for key, value in SERVICES[name].get("environment", {}).items()}


def test_services_present():
    assert {"postgres", "create-study", "fetch-data", "dashboard", "worker-gpu0"} <= set(SERVICES)
    assert len(WORKERS) >= 2


def test_postgres_is_pinned_and_healthchecked():
    postgres = SERVICES["postgres"]
    assert re.fullmatch(r"postgres:15(\.\d+)*(-\w+)?", postgres["image"])
    check = postgres["healthcheck"]
    assert check["test"][0] == "CMD-SHELL" and "pg_isready" in check["test"][1]
    assert check["retries"] >= 3 and "interval" in check


def test_images_are_ours_and_pinned():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE).group(1)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base), base
    assert re.search(r"pip install[^\n]* \.", dockerfile)
    for name in OURS:
        assert SERVICES[name]["build"]["context"] == "." and SERVICES[name]["image"] == "pcvit:latest", name


def test_data_lives_in_named_volumes():
    declared = set(COMPOSE["volumes"])
    mounts = {}
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert source in declared, f"{name} mounts {source!r}, not a named volume"
            mounts.setdefault(source, set()).add((name, target))
    assert mounts["pgdata"] == {("postgres", "/var/lib/postgresql/data")}
    assert mounts["data"] == {("fetch-data", "/app/data"), *((name, "/app/data") for name in WORKERS)}
    artifact_users = {name for name, _ in mounts["artifacts"]}
    assert artifact_users == {"dashboard", *WORKERS}
    assert {target for _, target in mounts["artifacts"]} == {"/artifacts"}
    command = SERVICES["dashboard"]["command"]
    assert command[command.index("--artifact-dir") + 1] == "/artifacts"


def test_each_worker_reserves_its_own_gpu():
    seen = []
    for name in WORKERS:
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        assert device["device_ids"] == [name.removeprefix("worker-gpu")], name
        seen += device["device_ids"]
    assert len(seen) == len(set(seen))
    assert "profiles" not in SERVICES["worker-gpu0"]  # `docker compose up` starts one worker


def test_workers_stop_gracefully_and_only_the_launcher_restarts_them():
    for name in WORKERS:
        worker = SERVICES[name]
        assert worker["stop_signal"] == "SIGTERM"
        grace = int(re.fullmatch(r"(\d+)s", worker["stop_grace_period"]).group(1))
        command = worker["command"]
        assert command[0] == "pcvit-launch" and float(command[command.index("--kill-after") + 1]) < grace
        # exit 0 (budget spent), 1 (systematic error), 2 (bad input) are final: Docker must not loop on them
        assert worker["restart"] == "no"


def test_published_ports_bind_to_loopback_by_default():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            host_ip = interpolate(port, {}).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port}"
    assert SERVICES["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]


def test_start_order():
    healthy = {"postgres": {"condition": "service_healthy"}}
    created = {"create-study": {"condition": "service_completed_successfully"}}
    assert SERVICES["create-study"]["depends_on"] == healthy
    assert SERVICES["dashboard"]["depends_on"] == created
    fetched = {"fetch-data": {"condition": "service_completed_successfully"}}
    for name in WORKERS:
        assert SERVICES[name]["depends_on"] == {**healthy, **created, **fetched}
    assert SERVICES["create-study"]["restart"] == SERVICES["fetch-data"]["restart"] == "no"


def test_no_secret_is_committed():
    text = interpolate((REPO / "docker-compose.yml").read_text(), {"POSTGRES_PASSWORD": "marker"})
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "a URL carries a password"
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key):
                assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", str(value)), f"{name}.{key} = {value!r}"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):  # no default password: compose refuses
        service_env("postgres", {})
    assert ".env" in (REPO / ".gitignore").read_text().split()
    example = (REPO / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=change-me$", example, re.MULTILINE)


def code_reads_env() -> set[str]:
    """Environment variable names read by the project's code: literal or through a NAME_ENV constant."""
    sources = [REPO / "objective.py", *REPO.glob("studies/**/*.py"), *REPO.glob("storage/**/*.py"),
               *REPO.glob("pcvit/**/*.py")]
    texts = [path.read_text() for path in sources if path.exists()]
    constants = dict(m for text in texts for m in re.findall(r"""^(\w+)\s*=\s*["'](\w+)["']""", text, re.MULTILINE))
    reads = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*(?:["'](\w+)["']|(\w+))""")
    names = set()
    for text in texts:
        for literal, constant in reads.findall(text):
            names.add(literal or constants.get(constant, constant))
    return names


def test_environment_names_match_what_the_code_reads():
    read = code_reads_env()
    assert {"OPTUNA_STORAGE", "PCVIT_ARTIFACT_DIR", "PCVIT_CODE_VERSION"} <= read
    for name in OURS:
        for key in SERVICES[name].get("environment", {}):
            assert key in read or key in READ_BY_OTHERS, f"{name} sets {key}, which nothing reads"
    for name in ["create-study", *WORKERS]:  # the dashboard takes its URL as an argument
        assert "OPTUNA_STORAGE" in SERVICES[name]["environment"], name
    for name in WORKERS:
        assert SERVICES[name]["environment"]["PCVIT_ARTIFACT_DIR"] == "/artifacts"
    assert "PCVIT_CODE_VERSION" in SERVICES["worker-gpu0"]["build"]["args"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ENV PCVIT_CODE_VERSION=\$\{PCVIT_CODE_VERSION\}", dockerfile, re.MULTILINE)
    optuna_help = subprocess.run([BIN / "optuna", "create-study", "--help"], capture_output=True, text=True).stdout
    assert "OPTUNA_STORAGE" in optuna_help  # the creator's storage comes from the environment


class Parsed(Exception):
    """Raised in place of running the worker, carrying what its parser made of the arguments."""


def parse_worker_args(monkeypatch, args: list[str]) -> argparse.Namespace:
    """Run the worker's own argument parser on `args` (SystemExit(2) if it rejects them), nothing else."""
    import objective

    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(real_parse(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        objective.main(args)
    monkeypatch.undo()
    return parsed.value.args[0]


def test_worker_command_is_the_worker_cli(monkeypatch):
    entry_points = configparser.ConfigParser()
    entry_points.read(REPO / "setup.cfg")
    lines = entry_points["options.entry_points"]["console_scripts"].strip().splitlines()
    scripts = dict(line.split(" = ") for line in lines)
    assert scripts["pcvit-worker"] == "objective:main"
    with pytest.raises(SystemExit):  # the capture really parses: a wrong argument is refused
        parse_worker_args(monkeypatch, ["--study-file", "x.yaml", "--no-such-option"])
    study_names = set()
    for name in WORKERS:
        command = SERVICES[name]["command"]
        own, worker_args = launch.split_argv(command[1:])
        launched, unknown = launch.build_parser().parse_known_args(own)
        assert not unknown
        assert command[0] == "pcvit-launch" and launched.gpus == "0" and str(launched.log_dir) == launch.STDOUT
        args = parse_worker_args(monkeypatch, worker_args)
        study_file = REPO / args.study_file
        assert study_file.exists(), f"{name} runs {study_file}, which does not exist"
        study = yaml.safe_load(study_file.read_text())
        assert study["name"] == args.study_name
        study_names.add(args.study_name)
    creator = SERVICES["create-study"]["command"]
    assert study_names == {creator[creator.index("--study-name") + 1]}
    assert creator[creator.index("--direction") + 1] == study["direction"]


def test_fetch_data_fills_the_folder_the_workers_read(tmp_path, capsys):
    command = SERVICES["fetch-data"]["command"]
    assert command == ["python", "-m", "pcvit.data"]
    import pcvit.data
    from tests.test_data import write_fake_cifar10

    write_fake_cifar10(tmp_path)  # the files present: the module reports them without downloading
    assert pcvit.data.main([str(tmp_path)]) == 0
    assert "CIFAR-10 ready" in capsys.readouterr().out
    workdir = re.search(r"^WORKDIR\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert f"{workdir}/{pcvit.data.CIFAR10_DIR}".startswith("/app/data/")  # inside the data volume
    for name in WORKERS:
        study = yaml.safe_load((REPO / SERVICES[name]["command"][-1]).read_text())
        assert study["fixed"]["dataset"] == "cifar10" and not study["fixed"].get("data_dir")


@pytest.fixture(scope="module")
def password_server():
    """A server that requires a password on TCP, as the compose postgres does."""
    try:
        server = pg.LocalPostgres(password="c0mpose-secret")
    except pg.PostgresUnavailable as exc:
        pytest.skip(str(exc))
    server.new_database("pcvit")
    yield server
    server.close()


def compose_env(server: pg.LocalPostgres, service: str, tmp_path: Path) -> dict[str, str]:
    """What compose would set in `service`, pointed at the local server instead of host `postgres`."""
    dot_env = {"POSTGRES_PASSWORD": server.password}  # the rest keep their defaults
    env = service_env(service, dot_env)
    if "OPTUNA_STORAGE" in env:
        env["OPTUNA_STORAGE"] = env["OPTUNA_STORAGE"].replace("@postgres:5432/", f"@127.0.0.1:{server.port}/")
    return {**os.environ, "HOME": str(tmp_path), **env}


def compose_command(service: str, server: pg.LocalPostgres) -> list[str]:
    command = [interpolate(arg, {}) for arg in SERVICES[service]["command"]]
    command = [arg.replace("@postgres:5432/", f"@127.0.0.1:{server.port}/") for arg in command]
    return [str(BIN / command[0]), *command[1:]]


@pytest.mark.slow
def test_password_reaches_clients_through_pgpassword_only(password_server, tmp_path):
    env = compose_env(password_server, "create-study", tmp_path)
    assert "PGPASSWORD" in service_env("dashboard", {"POSTGRES_PASSWORD": "x"})
    assert ":" not in env["OPTUNA_STORAGE"].split("@")[0].split("//")[1]  # no password in the URL
    connect = "import os, sqlalchemy; sqlalchemy.create_engine(os.environ['OPTUNA_STORAGE']).connect()"
    probe = [sys.executable, "-c", connect]
    assert subprocess.run(probe, env=env, capture_output=True).returncode == 0
    without = {k: v for k, v in env.items() if k != "PGPASSWORD"}
    refused = subprocess.run(probe, env=without, capture_output=True, text=True)
    assert refused.returncode != 0 and "password" in refused.stderr


@pytest.mark.slow
def test_creator_and_dashboard_commands_run_as_written(password_server, tmp_path):
    env = compose_env(password_server, "create-study", tmp_path)
    creator = compose_command("create-study", password_server)
    for _ in range(2):  # the second run proves --skip-if-exists
        result = subprocess.run(creator, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr

    command = compose_command("dashboard", password_server)
    port = pg.free_port()
    command[command.index("--host") + 1] = "127.0.0.1"  # tests serve on loopback only
    command[command.index("--port") + 1] = str(port)
    command[command.index("--artifact-dir") + 1] = str(tmp_path / "artifacts")
    dashboard = subprocess.Popen(command, env=compose_env(password_server, "dashboard", tmp_path),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = None
        deadline = time.monotonic() + 60
        while body is None and time.monotonic() < deadline:
            assert dashboard.poll() is None, dashboard.communicate()[0]
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read().decode()
            except OSError:
                time.sleep(0.2)
        assert body is not None, "dashboard did not answer"
        assert '"pcvit-12block"' in body
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
