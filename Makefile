# One-command set-up on a fresh machine with Python 3.10+:
#   make test   create .venv, install pmakit with its test and docs extras, run the whole suite
#               (the docs tools are installed because tests/docs build the site: the strict gate is tested)
#   make demo   same set-up, then run the PMA pre-training example (examples/pretrain_pma.py)
#   make bench  same set-up plus the peers (mergekit), then run the benchmarks (merge, update, export, the
#               command's start-up) and print one table of every figure beside its goal and bound
#               (benchmarks/results/summary.md)
#   make quality  ruff lint and format check (what CI runs before the tests)
#   make test-deepspeed  also install DeepSpeed (no CUDA ops) and run the ZeRO-on-CPU tests (CI runs it after make test)
#   make docs   same set-up plus the docs extra, then build the site into site/ (strict: broken links fail)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned to the CPU build first so that no dependency pulls a CUDA build of several GB.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Tool versions CI was verified with (ruff, mkdocs and its plugins, griffe): every install passes them with -c,
# so a tool's new release cannot change the verdict on unchanged code. Runtime dependencies stay open.
PINS   := ci-constraints.txt
PIPI   := $(PIP) install -q -c $(PINS)

.PHONY: install test test-deepspeed demo bench quality format docs clean

$(STAMP): pyproject.toml Makefile $(PINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIPI) "$(TORCH)"
	$(PIPI) -e ".[test,examples,docs]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Separate from `make test` for time (CI runs both): the pip install takes ~65 s; DeepSpeed's CPU
# communication op is compiled with g++ once, here (~1 min of CPU and 1.5 GB per source file; 4 min of
# wall time on a loaded 2-core machine), so that no test's timeout has to cover it; the tests then take
# ~95 s (ZeRO 1-3) plus ~90 s for each Trainer run (ZeRO 2 and 3) plus the ZeRO checkpoint reader's.
# The op is built into the venv (TORCH_EXTENSIONS_DIR), not ~/.cache: a lock left there by a killed build
# would make every later start wait on it forever. A lock left in the venv's folder is cleared here,
# before the build that would wait on it.
TORCH_EXT := $(abspath $(VENV))/torch_extensions
DS_ENV    := DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(TORCH_EXT)
$(VENV)/.deepspeed: $(STAMP)
	DS_BUILD_OPS=0 $(PIPI) -e ".[deepspeed]" "$(TORCH)"
	rm -f $(TORCH_EXT)/*/lock
	$(DS_ENV) $(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
		a().create_op_builder('ShareMemCommBuilder').load()"
	touch $(VENV)/.deepspeed

# --timeout above the tests' own (400-500 s for a torchrun, then 60 s to stop it): pytest-timeout's 300 s
# default fired first on a loaded machine and left the torchrun workers running, orphaned.
test-deepspeed: $(VENV)/.deepspeed
	$(DS_ENV) $(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests/distributed/test_deepspeed.py \
		tests/distributed/test_zero_merge.py tests/distributed/test_trainer_backends.py -k "deepspeed or zero" \
		$(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m examples.pretrain_pma --output_dir runs/pretrain_pma

$(VENV)/.bench: $(STAMP)
	$(PIPI) -e ".[bench]" "$(TORCH)"
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	$(PY) -m benchmarks.update
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.merge --mergekit $(VENV)/bin/mergekit-yaml
	$(PY) -m benchmarks.export
	$(PY) -m benchmarks.startup
	$(PY) -m benchmarks.table

$(VENV)/.quality: pyproject.toml Makefile $(PINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIPI) ruff
	touch $(VENV)/.quality

quality: $(VENV)/.quality
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: $(VENV)/.quality
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

# No --quiet: it drops the warnings that --strict counts, and the gate could not fail.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs build site *.egg-info src/*.egg-info
