# Two commands do all set-up on a fresh machine (no GPU needed):
#   make demo   - create .venv, install vitmerge, run the embedded default job (vitmerge demo)
#   make test   - create .venv, install vitmerge with test extras, run the test suite (what CI runs;
#                 tests marked slow are left to `make test-slow`, `make test-all` runs both)
#   make mutate - mutation-test the core ([tool.mutmut] in pyproject.toml; hours on 2 cores, not CI).
#                 MUTANTS='vitmerge.merging.base*' runs a part; `.venv/bin/mutmut results` lists survivors
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

MUTANTS     ?=
MUTATE_JOBS ?= 2

.PHONY: demo test test-slow test-all mutate bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# timm needs torchvision; this pair installs from the local wheel cache where one exists.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitmerge demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

mutate: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,mutate]"
	$(PY) -m mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(PY) -m mutmut results

bench: $(STAMP)
	$(PY) bench/bench_ort.py

clean:
	rm -rf $(VENV) vitmerge-demo .pytest_cache mutants
