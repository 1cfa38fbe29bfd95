# `make demo` and `make test` each build or refresh the local venv first, so both work on a fresh machine.
# torch==2.13.0 is installed before anything that depends on torch: on the CPU hosts that pin resolves to a
# local CPU wheel, while an unpinned torch would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meteora-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[torch,gguf,eval,test]"
	@touch $(STAMP)

demo: venv
	$(PY) scripts/demo.py --out demo_out

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The triton package (CPU wheel, ~190 MB, not a dependency) lives in .triton/ for the tests that run a Triton
# kernel in Triton's interpreter or compile it for sm_90 (tests/test_jax_triton.py, test_kernel_report.py).
TRITON_STAMP := .triton/.meteora-installed

$(TRITON_STAMP): | venv
	$(PY) -m pip install -q --no-deps --target .triton triton==3.6.0
	@touch $@

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: lint $(TRITON_STAMP)
	@$(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .triton demo_out .pytest_cache .ruff_cache
