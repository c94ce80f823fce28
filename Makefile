# Quick start: `make demo` trains the tiny built-in model end to end; `make test` runs the tests.
# Both first create a local virtualenv (.venv) with a CPU build of torch: `make demo` installs
# only what the package needs, `make test` adds the test tools (notebooks, browser test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch

.PHONY: demo test venv clean venv-colab test-newest test-colab notebooks dist

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

# Both environments: the newest libraries (.venv, as on Kaggle) and the Colab replica.
test: test-newest test-colab

test-newest: $(VENV)/.installed-test
	$(PY) -m pytest -q

# ---- The Colab replica: Colab's preinstalled versions (constraints-colab.txt, from
# googlecolab/backend-info), our CPU torch, and the package installed by the notebooks' own
# install cell, which must change none of them (tools/check_colab_install.py).
COLAB_VENV := .venv-colab
COLAB_PY := $(COLAB_VENV)/bin/python
# What Colab preinstalls that the package, the notebooks and the tests use.
COLAB_PREINSTALLED := pip torch diffusers transformers accelerate peft huggingface_hub \
	safetensors numpy pillow tqdm ipywidgets widgetsnbextension ipython ipykernel traitlets \
	notebook jupyter_client nbclient nbformat psutil pytest
# Test tools Colab lacks, installed after the check (still held to Colab's versions).
COLAB_TEST_TOOLS := selenium lion-pytorch prodigyopt lycoris-lora
# What runs there: the notebooks, the widgets (ipywidgets 7), the browser (classic notebook),
# the install cell, and the modules that call diffusers/transformers/peft the most.
COLAB_TESTS ?= tests/test_install_cell.py tests/test_widgets.py tests/test_notebooks.py \
	tests/test_browser.py tests/test_runtime.py tests/test_models.py tests/test_sample.py \
	tests/test_lora.py tests/test_lora_types.py tests/test_export.py tests/test_captioning.py \
	tests/test_tiny_sdxl.py tests/test_sdxl_single_file.py tests/test_sdxl_train.py

venv-colab: $(COLAB_VENV)/.installed

$(COLAB_VENV)/.installed: setup.cfg pyproject.toml constraints-colab.txt tools/check_colab_install.py \
		notebooks/01_prepare_data.ipynb
	rm -rf $(COLAB_VENV)
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) -m pip install -q -c constraints-colab.txt $(COLAB_PREINSTALLED)
	$(COLAB_PY) tools/check_colab_install.py notebooks/01_prepare_data.ipynb .
	$(COLAB_PY) -m pip install -q -c constraints-colab.txt $(COLAB_TEST_TOOLS)
	$(COLAB_PY) -m pip install -q --no-deps open-clip-torch
	touch $@

test-colab: venv-colab
	$(COLAB_PY) -m pytest -q $(COLAB_TESTS)

# The notebooks' badges and install cell, regenerated from setup.cfg (url, name).
notebooks: venv
	$(PY) tools/notebook_cells.py

# The wheel and sdist that would be published, into dist/.
dist: venv
	$(PY) -m pip install -q build
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) $(COLAB_VENV) demo-output dist build *.egg-info
