"""The root of every error the package raises for a user's input or situation.

A ``UserError`` carries a message that already says what is wrong and what to do, so the
command line prints it as one line (``error: ...``) and exits 1 instead of showing a
traceback; anything else escaping is a bug and keeps its traceback. Each module's own error
class (``ConfigError``, ``DataError``, ``ModelLoadError``, ...) derives from it as well as from
the built-in class it always had, so existing ``except ValueError`` code keeps working.

This module imports nothing from the package, so every module can import it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or situation; its message says what to do."""


__all__ = ["UserError"]
