"""Run a notebook's install cell in this Python environment and fail if it changed the version
of any package installed before it (Colab's preinstalled ones, in the Colab replica).

Usage: ``python tools/check_colab_install.py NOTEBOOK SOURCE`` where SOURCE replaces the cell's
``PACKAGE_SOURCE`` (the checkout folder in CI, as a user may point it at a folder or wheel).
The cell runs as a script in an empty folder, as on a fresh runtime, so nothing of the checkout
is importable beforehand. ``make venv-colab`` runs this.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def installed() -> dict[str, str]:
    """{normalized name: version} of this environment, as pip sees it."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json",
                          "--disable-pip-version-check"], check=True, capture_output=True,
                         text=True).stdout
    return {re.sub(r"[-_.]+", "-", p["name"].lower()): p["version"] for p in json.loads(out)}


def changed_versions(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """"name: old -> new" (or "-> removed") for every package of ``before`` that changed."""
    return [f"{name}: {old} -> {after.get(name, 'removed')}"
            for name, old in sorted(before.items()) if after.get(name) != old]


def install_cell_source(notebook: Path, source: str) -> str:
    """The notebook's install cell with ``PACKAGE_SOURCE`` set to ``source``."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    cell = next("".join(c["source"]) for c in cells
                if c["cell_type"] == "code" and "PACKAGE_SOURCE =" in "".join(c["source"]))
    return re.sub(r"^PACKAGE_SOURCE = .*$", f"PACKAGE_SOURCE = {source!r}", cell, count=1,
                  flags=re.M)


def main(argv: list[str]) -> int:
    notebook, source = Path(argv[0]), str(Path(argv[1]).resolve())
    before = installed()
    with tempfile.TemporaryDirectory() as empty:
        subprocess.run([sys.executable, "-c", install_cell_source(notebook, source)], cwd=empty,
                       check=True)
        subprocess.run([sys.executable, "-c", "import colab_dreambooth, widgets"], cwd=empty,
                       check=True)
    after = installed()
    changed = changed_versions(before, after)
    added = sorted(f"{n} {v}" for n, v in after.items() if n not in before)
    print(f"The install cell added {len(added)} package(s): {', '.join(added)}")
    if changed:
        print("FAIL: the install cell changed preinstalled packages:\n  " + "\n  ".join(changed),
              file=sys.stderr)
        return 1
    print(f"OK: none of the {len(before)} preinstalled packages changed version.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
