"""The package layout is the architecture: each layer imports only from the layers below it.

    antavo_ometria.{problems,transport,values}   foundation: plain helpers
    antavo_ometria.antavo, antavo_ometria.ometria the source and the destination, side by side
    antavo_ometria.sync                           the sync core: mapping, transform, quality, state, steps, report
    antavo_ometria.airflow                        hooks, sensors, triggers, the dashboard: the only code that imports Airflow
    antavo_ometria_tools                          command line and sandbox, beside production, never imported by it
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SRC = PROJECT / "src"
FOUNDATION = ("antavo_ometria.problems", "antavo_ometria.transport", "antavo_ometria.values")
ALLOWED = {  # a module's layer → the layers it may import from (besides its own)
    "foundation": set(),
    "antavo": {"foundation"},
    "ometria": {"foundation"},
    "sync": {"foundation", "antavo", "ometria"},
    "airflow": {"foundation", "antavo", "ometria", "sync"},
}


def layer(module: str) -> str | None:
    if module.startswith(FOUNDATION):
        return "foundation"
    parts = module.split(".")
    if parts[0] == "antavo_ometria" and len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return None


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (`from a import b` counts as a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path.name}: relative import; the layers are checked on absolute ones"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def test_each_layer_imports_only_from_the_layers_below_it():
    wrong = []
    for path in (SRC / "antavo_ometria").rglob("*.py"):
        if "migrations" in path.parts:
            continue
        own = layer(module_name(path))
        for imported in imports(path):
            other = layer(imported)
            if imported.startswith("antavo_ometria_tools"):
                wrong.append(f"{module_name(path)} imports the tools package ({imported})")
            elif other is not None and other != own and other not in ALLOWED[own]:
                wrong.append(f"{module_name(path)} ({own}) imports {imported} ({other})")
            elif re.match(r"(airflow|fastapi)\b", imported) and own != "airflow":
                wrong.append(f"{module_name(path)} ({own}) imports {imported}: only the airflow layer may")
    assert not wrong, "\n".join(sorted(wrong))


def test_dags_and_plugins_use_the_package_and_never_the_tools():
    for path in [*(PROJECT / "dags").glob("*.py"), *(PROJECT / "plugins").glob("*.py")]:
        assert not {m for m in imports(path) if m.startswith("antavo_ometria_tools")}, path.name


def test_the_sandbox_shares_no_rule_with_the_code_it_checks():
    for path in (SRC / "antavo_ometria_tools" / "sandbox").rglob("*.py"):
        assert not {m for m in imports(path) if m.startswith("antavo_ometria.")}, path.name


def test_no_path_edits_find_the_package():
    files = [*PROJECT.glob("*.toml"), PROJECT / "Makefile", PROJECT / "docker-compose.yaml", PROJECT / "Dockerfile",
             *(p for folder in ("src", "dags", "plugins", "tests", "benchmarks") for p in (PROJECT / folder).rglob("*.py"))]
    edits = [str(p.relative_to(PROJECT)) for p in files if p != Path(__file__)
             and re.search(r"sys\.path\b|PYTHONPATH|pythonpath", p.read_text(encoding="utf-8"))]
    assert not edits


def test_plugins_holds_only_airflow_plugins():
    assert sorted(p.name for p in (PROJECT / "plugins").iterdir() if p.name != "__pycache__") == ["sync_dashboard.py"]


def test_no_function_in_src_grows_over_the_complexity_budget():
    # make lint runs the same check; here CI runs it too
    run = subprocess.run([sys.executable, "-m", "benchmarks.complexity"], cwd=PROJECT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
