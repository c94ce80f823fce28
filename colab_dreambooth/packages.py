"""Which optional packages really import here (not merely installed): bitsandbytes for 8-bit
optimizer states, xformers for its attention kernels. Colab's own package set has neither.

Each is imported once per process (a broken CUDA build of bitsandbytes fails at import, so
``find_spec`` would say yes where training would fail).
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache

log = logging.getLogger(__name__)

OPTIONAL = ("bitsandbytes", "xformers")
INSTALL_HINT = "pip install 'colab-dreambooth[cuda]'"


@lru_cache(maxsize=None)
def importable(name: str) -> bool:
    """True when ``import name`` succeeds in this process (cached)."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a CUDA library missing at import time
        log.debug("%s does not import: %s", name, exc)
        return False
    return True


def optional_packages() -> dict[str, bool]:
    """Whether each optional package imports, e.g. ``{"bitsandbytes": False, "xformers": False}``."""
    return {name: importable(name) for name in OPTIONAL}


__all__ = ["INSTALL_HINT", "OPTIONAL", "importable", "optional_packages"]
