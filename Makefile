# Two commands set everything up on a fresh machine: `make test` and `make train`.
# Each creates .venv with Python 3.12 (found by tools/find_python312.sh) and installs
# the project editable with the pinned versions in constraints.txt before running.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: test test-slow test-torch lint format train bench docs clean

$(STAMP): pyproject.toml constraints.txt tools/find_python312.sh
	@set -e; \
	if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then \
	  py=$$(tools/find_python312.sh); \
	  echo "creating $(VENV) with $$py"; \
	  rm -rf $(VENV); "$$py" -m venv $(VENV); \
	fi; \
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip; \
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'; \
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The oracle tests against torch.nn / timm on the same weights (marker `torch`; `make test` skips
# them when torch is absent). Installs the `torch` extra, with torch's CPU-only wheels.
TORCH_STAMP := $(VENV)/.installed-torch
$(TORCH_STAMP): $(STAMP)
	@# The CPU-only wheel when PyTorch's index is reachable; otherwise the PyPI wheel.
	$(PY) -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 \
	  --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch \
	|| $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,torch]'
	touch $(TORCH_STAMP)

test-torch: $(TORCH_STAMP)
	JAXBLOCKS_REQUIRE_TORCH=1 $(PY) -m pytest -q -m torch -n $(PYTEST_WORKERS)

train: $(STAMP)
	$(PY) -m jaxblocks.train.cli $(ARGS)

# Appends to BENCHMARKS.md (`python -m benchmarks.run NAME` alone only prints); ARGS=--quick.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(NAME) --append BENCHMARKS.md $(ARGS)

# The API reference (pdoc) in docs/api; warnings fail the build (tests/test_docs.py checks it).
docs: $(STAMP)
	$(PY) tools/build_docs.py docs/api

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
