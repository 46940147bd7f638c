"""pcvit/ is the bottom layer: PyTorch only, no Optuna, W&B or database code (design.md)."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("optuna", "wandb", "sqlalchemy", "psycopg2", "studies", "storage", "objective")
PCVIT = Path(__file__).resolve().parents[1] / "pcvit"


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_of_pcvit_imports_the_runner_layers():
    for path in PCVIT.rglob("*.py"):
        allowed = {"objective"} if path.name == "cli.py" else set()  # --from-trial: lazy, only when asked for
        leaked = (imported_top_level_names(path) & set(FORBIDDEN)) - allowed
        assert not leaked, f"{path.name} imports {sorted(leaked)}"


def test_importing_pcvit_loads_none_of_them():
    code = ("import sys, pcvit, pcvit.cli, pcvit.train; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PCVIT.parent)
    assert out.stdout.strip() == "[]"


def test_storage_knows_no_trials():
    """storage/ is where data lives; logic that knows trials and studies (reaping, retries) is the runner's."""
    for path in (PCVIT.parent / "storage").rglob("*.py"):
        leaked = imported_top_level_names(path) & {"studies", "objective", "pcvit"}
        assert not leaked, f"storage/{path.name} imports {sorted(leaked)}"
