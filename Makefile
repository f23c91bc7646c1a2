# One-command set-up on a fresh machine with Python 3.10+:
#   make test   create .venv, install pmakit with its test extras, run the whole suite
#   make demo   same set-up, then run the PMA pre-training example (examples/pretrain_pma.py)
#   make bench  same set-up plus the peers (mergekit), then run the benchmarks and print one table of
#               every figure beside its goal and bound (benchmarks/results/summary.md)
#   make quality  ruff lint and format check (what CI runs before the tests)
#   make test-deepspeed  also install DeepSpeed (no CUDA ops) and run the ZeRO-on-CPU tests (optional: see below)
#   make docs   same set-up plus the docs extra, then build the site into site/ (strict: broken links fail)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned to the CPU build first so that no dependency pulls a CUDA build of several GB.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-deepspeed demo bench quality format docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,examples]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Not part of `make test`: measured on 2 shared cores, the pip install takes ~65 s, DeepSpeed's first start
# builds its CPU communication op with g++ (~50 s of CPU and 1.5 GB per source file, cached afterwards in
# ~/.cache/torch_extensions), and the tests take ~95 s (ZeRO 1-3) plus ~90 s for each Trainer run (ZeRO 2 and 3).
$(VENV)/.deepspeed: $(STAMP)
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[deepspeed]" "$(TORCH)"
	touch $(VENV)/.deepspeed

test-deepspeed: $(VENV)/.deepspeed
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -p no:cacheprovider tests/distributed/test_deepspeed.py \
		tests/distributed/test_trainer_backends.py -k deepspeed $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/pretrain_pma.py --output_dir runs/pretrain_pma

$(VENV)/.bench: $(STAMP)
	$(PIP) install -q -e ".[bench]" "$(TORCH)"
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	$(PY) benchmarks/update.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/merge.py --mergekit $(VENV)/bin/mergekit-yaml
	$(PY) benchmarks/export.py
	$(PY) benchmarks/table.py

$(VENV)/.quality: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "ruff>=0.6,<1"
	touch $(VENV)/.quality

quality: $(VENV)/.quality
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: $(VENV)/.quality
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

$(VENV)/.docs: $(STAMP)
	$(PIP) install -q -e ".[docs]" "$(TORCH)"
	touch $(VENV)/.docs

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) runs build site *.egg-info src/*.egg-info
