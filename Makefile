# Set-up, training and tests. `make setup` creates .venv with the CPU build of torch;
# on a CUDA machine run `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128`
# (or any index that carries the CUDA build you need).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup lint train test test-slow docs-check bench clean gpu-wheels

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

# Every README command and example: checked against the configs and parsers (fast), then run on small data (slow).
docs-check: setup
	$(PY) -m pytest -q tests/test_readme_commands.py
	$(PY) -m pytest -q -m readme tests/test_readme_run.py

bench: setup
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) bench/run.py all

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache

# Wheels a CUDA machine without package access lacks, for Python 3.12 on x86-64 (bench/gpu_check.sh installs them)
GPU_WHEELS ?= hydra-core==1.3.8 omegaconf==2.3.1 faiss-cpu==1.15.1 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 fastapi-offline uvicorn==0.55.0
gpu-wheels: setup
	mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
