# Quick start: `make demo` trains the tiny built-in model end to end; `make test` runs the tests.
# Both first create a local virtualenv (.venv) with a CPU build of torch: `make demo` installs
# only what the package needs, `make test` adds the test tools (notebooks, browser test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch

.PHONY: demo test venv clean

venv: $(VENV)/.installed-test

$(VENV)/.installed-core: setup.cfg pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt "$(TORCH)"
	$(PY) -m pip install -q -c constraints-cpu.txt -e .
	# open-clip-torch only for its CLIP vocabulary file; --no-deps keeps torchvision out.
	$(PY) -m pip install -q --no-deps open-clip-torch
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-core
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[test]"
	touch $@

demo: $(VENV)/.installed-core
	$(PY) -m colab_dreambooth demo --out demo-output

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output
