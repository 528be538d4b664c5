# Two commands do all set-up on a fresh machine (no GPU needed):
#   make demo   - create .venv, install vitmerge, run the embedded default job (vitmerge demo)
#   make test   - create .venv, install vitmerge with test extras, run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# timm needs torchvision; this pair installs from the local wheel cache where one exists.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev,cpu]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitmerge demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_ort.py

clean:
	rm -rf $(VENV) vitmerge-demo .pytest_cache
