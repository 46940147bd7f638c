"""The layers hold: pcvit/ is the bottom (PyTorch only, no Optuna, W&B or database code), the runner sits on it
(storage/, then studies/, then objective.py on top), no module imports a layer above its own, and no modules
import each other in a circle. Imports inside functions count too."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

FORBIDDEN = ("optuna", "wandb", "sqlalchemy", "psycopg2", "studies", "storage", "objective")
PCVIT = REPO / "pcvit"
LAYERS = ("pcvit", "storage", "studies.studyfile", "studies.running", "studies.results", "studies.cli",
          "objective")  # each may import only those before it (and itself)


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest layer name `module` falls under (`studies.running.worker` -> running)."""
    matches = [i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS"
    return max(matches, key=lambda i: len(LAYERS[i]))


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
        leaked = imported_top_level_names(path) & set(FORBIDDEN)
        assert not leaked, f"{path.name} imports {sorted(leaked)}"


def test_importing_pcvit_loads_none_of_them():
    code = ("import sys, pcvit, pcvit.cli, pcvit.train; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PCVIT.parent)
    assert out.stdout.strip() == "[]"


def test_the_launcher_imports_no_torch():
    """pcvit-launch only starts processes: importing torch would cost seconds per launcher."""
    code = "import sys, studies.running.launch; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pcvit'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PCVIT.parent)
    assert out.stdout.strip() == "[]"


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (`pcvit.train`, `studies.studyfile.spec`, ...)."""
    paths = [REPO / "objective.py", *(p for top in ("pcvit", "storage", "studies") for p in (REPO / top).rglob("*.py"))]
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree)  # `if TYPE_CHECKING:` imports are for annotations only
                       if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
                       for n in ast.walk(block)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def test_no_module_imports_a_layer_above_its_own():
    graph = project_imports()
    assert "studies.running.worker" in graph and "studies.results.report" in graph  # the walk sees the sub-packages
    for module, targets in graph.items():
        if module in ("studies", "studies.studyfile", "studies.running", "studies.results"):
            continue  # a package's __init__ only describes it
        for target in targets:
            above = layer_of(target) > layer_of(module)
            assert not above, f"{module} imports {target}, a layer above its own"


def test_no_import_circles():
    graph = project_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(t == goal or (t not in seen and not seen.add(t) and reaches(t, goal, seen)) for t in graph[start])

    circles = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if reaches(b, a, set()))
    assert not circles, f"imports in a circle: {circles}"


def test_storage_knows_no_trials():
    """storage/ is where data lives; logic that knows trials and studies (reaping, retries) is the runner's."""
    for path in (PCVIT.parent / "storage").rglob("*.py"):
        leaked = imported_top_level_names(path) & {"studies", "objective", "pcvit"}
        assert not leaked, f"storage/{path.name} imports {sorted(leaked)}"


PRIVATE_OPTUNA = ("._storage", "._trial_id", "._study_id", "optuna.storages._", "_CachedStorage", "_get_stale_trial_ids")


def test_only_the_seam_names_optunas_private_parts():
    """Optuna's internals are reached through storage/optuna_access.py only: an upgrade is mended there."""
    for path in [REPO / "objective.py", *(REPO / "studies").rglob("*.py"), *(REPO / "storage").glob("*.py")]:
        if path.name == "optuna_access.py":
            continue
        text = path.read_text()
        used = [name for name in PRIVATE_OPTUNA if name in text]
        assert not used, f"{path.relative_to(REPO)} names Optuna's private {used}: go through storage/optuna_access.py"
