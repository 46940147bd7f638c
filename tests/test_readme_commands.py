"""The README's quick start, run as written: every command of its first code block, in order, in one shell.

The block is read from README.md at test time, so a command changed there is the command tested. It runs in
a scratch folder laid out like the repository root for what the commands touch (`.venv` linked, an empty
`storage/`), so the study goes into that folder's `storage/pcvit.db`, never into the repository's. Two
changes, both for the test's sake: optuna-dashboard (a server that runs until stopped) is started in the
background on a free port, checked over HTTP and stopped; nothing else is altered.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import optuna
import pytest

from tests.helpers import REPO
from tests.pg import free_port


POLL = """import sys, time, urllib.request
for _ in range(120):
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()); break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("optuna-dashboard did not answer in 60 s")
"""


def quick_start_block() -> list[str]:
    """The command lines (comments and blank lines dropped) of the first bash block under '### Quick start'."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_quick_start_is_one_convention_of_commands():
    lines = quick_start_block()
    assert lines[0] == ". .venv/bin/activate"  # the convention: activate once, then bare commands
    assert not any(".venv/bin/" in line for line in lines[1:]), lines
    tools = {line.split()[0] for line in lines[1:] if not line.startswith("export ")}
    assert tools <= {"optuna", "pcvit-worker", "pcvit-study", "optuna-dashboard", "pcvit-launch", "pcvit-train"}


@pytest.mark.slow
def test_every_quick_start_command_runs_as_written(tmp_path):
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "storage").mkdir()
    port = free_port()
    script = ["set -euo pipefail"]
    for line in quick_start_block():
        if line.startswith("optuna-dashboard "):
            script += [f"{line} --port {port} > dashboard.log 2>&1 &", "echo $! > dashboard.pid"]
        else:
            script.append(line)
    script += [f"python -c {shlex.quote(POLL)} http://127.0.0.1:{port}/api/studies > studies.json", "kill $(cat dashboard.pid)"]
    env = {k: v for k, v in os.environ.items() if k not in ("OPTUNA_STORAGE", "VIRTUAL_ENV", "PCVIT_ARTIFACT_DIR")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/storage/pcvit.db")
    assert len(study.trials) == 6 and all(t.state.is_finished() for t in study.trials)
    assert "smoke" in done.stdout and "best_probe_accuracy" in done.stdout  # the report, printed last
    listed = json.loads((tmp_path / "studies.json").read_text())  # the dashboard served the study
    assert [s["study_name"] for s in listed["study_summaries"]] == ["smoke"]
    assert any((tmp_path / "storage" / "artifacts").iterdir())  # curves, reconstructions, checkpoints

