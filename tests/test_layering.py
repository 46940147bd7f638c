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
LAYERS = ("pcvit", "storage", "studies", "objective")  # each may import only those before it (and itself)


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
    code = "import sys, studies.launch; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pcvit'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PCVIT.parent)
    assert out.stdout.strip() == "[]"


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (`pcvit.train`, `studies.spec`, ...)."""
    paths = [REPO / "objective.py", *(p for layer in LAYERS[:3] for p in (REPO / layer).glob("*.py"))]
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
        graph[name] = {t for t in targets if t in modules and t != name and t != package}
    return graph


def test_no_module_imports_a_layer_above_its_own():
    for module, targets in project_imports().items():
        for target in targets:
            above = LAYERS.index(target.split(".")[0]) > LAYERS.index(module.split(".")[0])
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
