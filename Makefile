# Quick start: `make demo` trains the tiny built-in model end to end; `make test` runs the tests.
# Both first create a local virtualenv (.venv) with a CPU build of torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt "$(TORCH)"
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[test]"
	# open-clip-torch only for its CLIP vocabulary file; --no-deps keeps torchvision out.
	$(PY) -m pip install -q --no-deps open-clip-torch
	touch $@

demo: venv
	$(PY) -m colab_dreambooth demo --out demo-output

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output
