"""The complexity budget: no function in src/ over cyclomatic complexity 15 or longer than 60 lines.

    make lint                          # runs it after ruff
    python -m benchmarks.complexity    # the same, alone

The functions that were over budget when it was set are listed in benchmarks/complexity_allowed.txt. Any
other function over budget fails, and so does a listed one that is now within it (delete its line), so the
list only shrinks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from radon.complexity import cc_visit
from radon.visitors import Function

PROJECT = Path(__file__).resolve().parents[1]
ALLOWED_FILE = Path(__file__).with_name("complexity_allowed.txt")
MAX_COMPLEXITY = 15
MAX_LINES = 60


@dataclass(frozen=True)
class Measure:
    name: str  # path::function, path::Class.method or path::outer.inner
    complexity: int
    lines: int

    @property
    def over_budget(self) -> bool:
        return self.complexity > MAX_COMPLEXITY or self.lines > MAX_LINES

    def __str__(self) -> str:
        return f"{self.name}  # complexity {self.complexity}, {self.lines} lines"


def _functions(path: str, function: Function, outer: str = "") -> Iterator[Measure]:
    qualified = f"{outer}.{function.name}" if outer else function.fullname
    yield Measure(f"{path}::{qualified}", function.complexity, function.endline - function.lineno + 1)
    for closure in function.closures:
        yield from _functions(path, closure, qualified)


def measure(root: Path) -> list[Measure]:
    """Every function, method and nested function under `root`, with its complexity and length."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(PROJECT).as_posix()
        for block in cc_visit(path.read_text(encoding="utf-8")):
            if isinstance(block, Function):
                found.extend(_functions(relative, block))
    return found


def allowed(path: Path = ALLOWED_FILE) -> set[str]:
    """The names in the allow-list: one a line, anything after `#` is a note."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return {line.split("#", 1)[0].strip() for line in lines} - {""}


def verdict(measures: list[Measure], allow: set[str]) -> list[str]:
    """What breaks the budget: new functions over it, and listed ones that are within it (or gone)."""
    over = {m.name: m for m in measures if m.over_budget}
    problems = [f"over budget: {m}" for name, m in over.items() if name not in allow]
    problems += [f"within budget now (or gone): {name}; delete its line from {ALLOWED_FILE.name}"
                 for name in sorted(allow - set(over))]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every function over budget, listed or not")
    args = parser.parse_args(argv)
    measures = measure(PROJECT / "src")
    if args.list:
        print("\n".join(str(m) for m in measures if m.over_budget))
        return 0
    problems = verdict(measures, allowed())
    for problem in problems:
        print(problem)
    if problems:
        print(f"complexity budget: at most complexity {MAX_COMPLEXITY} and {MAX_LINES} lines a function; split it "
              "into small ones with one job each")
        return 1
    print(f"complexity budget kept: {len(allowed())} function(s) still listed in {ALLOWED_FILE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
