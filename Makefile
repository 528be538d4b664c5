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
# TensorRT's Python sources for tests/test_tensorrt_*.py (package:version: 10.16, the oldest supported and
# newest 10.x -- 10.8-10.15 corrupt string plugin fields under NumPy 2 -- and an 11.x). Binary wheels of
# about 1.2 MB each, installed side by side (each holds a tensorrt_bindings package); only their .py files
# are used, on a stand-in for the compiled module, so no GPU or TensorRT library is needed. Without
# network the step says so and those tests skip.
TRT_BINDINGS = tensorrt-cu12-bindings:10.16.1.11 tensorrt-cu13-bindings:11.4.0.106
TRT_STAMP = $(VENV)/trt-bindings/.fetched-$(shell echo "$(TRT_BINDINGS)" | cksum | cut -d' ' -f1)
# A Python 3.13 with numpy + onnx, for the plugin registration check under 3.13 (tests/support/plugin_py313_check.py):
# pyenv's or one on PATH; without one the step says so and that test skips.
PY313   ?= $(shell ls -d $$HOME/.pyenv/versions/3.13*/bin/python3.13 2>/dev/null | tail -n 1 || true)
VENV313 ?= .venv313
PY313_STAMP = $(VENV313)/.installed

MUTANTS     ?=
MUTATE_JOBS ?= 2

.PHONY: demo test test-slow test-all mutate bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# timm needs torchvision; this pair installs from the local wheel cache where one exists.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev,cpu]"
	rm -f $(VENV)/.installed-* && touch $@

$(TRT_STAMP): $(STAMP)
	@ok=1; for spec in $(TRT_BINDINGS); do pkg=$${spec%%:*}; ver=$${spec#*:}; dest=$(VENV)/trt-bindings/$$ver; \
	  test -f $$dest/tensorrt_bindings/plugin/_lib.py && continue; rm -rf $$dest; \
	  $(PY) -m pip install -q --retries 1 --timeout 20 --no-deps --only-binary=:all: --target $$dest "$$pkg==$$ver" \
	    || { rm -rf $$dest; ok=0; echo "note: $$pkg==$$ver not fetched: tests of TensorRT's tensorrt.plugin sources skip"; }; \
	done; test $$ok = 1 && touch $@ || true

$(PY313_STAMP):
	@py="$(PY313)"; test -n "$$py" || py=$$(command -v python3.13 || true); \
	if test -z "$$py"; then echo "note: no python3.13 found: the plugin check under Python 3.13 skips"; \
	else $$py -m venv $(VENV313) && $(VENV313)/bin/python -m pip install -q --retries 1 --timeout 20 numpy onnx \
	  && touch $@ || { rm -rf $(VENV313); echo "note: Python 3.13 venv not made: the plugin check under 3.13 skips"; }; fi

install: $(STAMP) $(TRT_STAMP) $(PY313_STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitmerge demo

test: $(STAMP) $(TRT_STAMP) $(PY313_STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP) $(TRT_STAMP) $(PY313_STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) $(TRT_STAMP) $(PY313_STAMP)
	$(PY) -m pytest -q

mutate: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,mutate]"
	$(PY) -m mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(PY) -m mutmut results

bench: $(STAMP)
	$(PY) bench/bench_ort.py

clean:
	rm -rf $(VENV) $(VENV313) vitmerge-demo .pytest_cache mutants
