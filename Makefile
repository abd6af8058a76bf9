# Set-up, training and tests. `make setup` creates .venv with the CPU build of torch;
# on a CUDA machine run `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128`
# (or any index that carries the CUDA build you need).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup lint train test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

train: setup
	$(PY) train.py

# The style check and the import layers (pyproject.toml: [tool.ruff], [tool.importlinter]) run first.
lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) bench/run.py all

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
