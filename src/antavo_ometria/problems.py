"""Configuration problems reported with file, line and column, all at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    column: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: [{self.column}] {self.message}" if self.column else f"{where}: {self.message}"


class ConfigError(Exception):
    """One or more problems in an analyst-edited file; nothing has been sent."""

    def __init__(self, problems: list[Problem], warnings: list[Problem] | tuple[Problem, ...] = ()):
        self.problems = problems
        self.warnings = list(warnings)  # shown with the problems: a typo warned about may be their cause
        lines = "\n".join([*(f"  {p}" for p in problems), *(f"  warning: {w}" for w in self.warnings)])
        also = f", and {len(self.warnings)} warning(s)" if self.warnings else ""
        super().__init__(f"{len(problems)} problem(s) in the sync configuration{also}:\n{lines}")
