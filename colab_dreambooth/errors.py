"""The root of every error the package raises for a user's input or situation.

A ``UserError`` carries a message that already says what is wrong and what to do, so the
command line prints it as one line (``error: ...``) and exits 1 instead of showing a
traceback; anything else escaping is a bug and keeps its traceback. Each module's own error
class (``ConfigError``, ``DataError``, ``ModelLoadError``, ...) derives from it as well as from
the built-in class it always had, so existing ``except ValueError`` code keeps working.

This module imports nothing from the package, so every module can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


class UserError(Exception):
    """An error caused by the user's input or situation; its message says what to do."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration or the data, and what to do about it."""

    where: str  # a field name, "concept 2 class_prompt", or a file path
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(UserError, ValueError):
    """The configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) with the configuration:\n{lines}")


class ModelLoadError(UserError, RuntimeError):
    """A base or trained model could not be loaded (missing, incomplete, or not a model at
    all); the message says why and what to do."""


__all__ = ["UserError", "Problem", "ConfigError", "ModelLoadError"]
