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


# The optimizers of the Optimizer field: module, class and pip package of each one that needs a
# package beyond torch (imported lazily: a run that does not pick one never needs it).
OPTIMIZER_PACKAGES: dict[str, tuple[str, str, str]] = {
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}


def missing_package_message(name: str) -> str:
    """What to do when optimizer ``name``'s package is missing."""
    package = OPTIMIZER_PACKAGES[name][2]
    return (f"the {name} optimizer needs the {package} package, which is not installed: "
            f"pip install 'colab-dreambooth[optimizers]' (or pip install {package}), or choose "
            "the AdamW optimizer")


def optimizer_available(name: str) -> bool:
    """True when optimizer ``name`` can be imported (checked without importing it)."""
    if name not in OPTIMIZER_PACKAGES:
        return True
    top = OPTIMIZER_PACKAGES[name][0].split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules
        return False


__all__ = ["INSTALL_HINT", "OPTIMIZER_PACKAGES", "importable", "missing_package_message",
           "optimizer_available"]
