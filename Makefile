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
# TensorRT's Python sources for tests/test_tensorrt_*.py (package:version: the oldest supported 10.x,
# the newest 10.x, an 11.x). Binary wheels of about 1.2 MB each, installed side by side (each holds a
# tensorrt_bindings package); only their .py files are used, on a stand-in for the compiled module,
# so no GPU or TensorRT library is needed. Without network the step says so and those tests skip.
TRT_BINDINGS = tensorrt-cu12-bindings:10.8.0.43 tensorrt-cu12-bindings:10.16.1.11 tensorrt-cu13-bindings:11.4.0.106
TRT_STAMP = $(VENV)/trt-bindings/.fetched-$(shell echo "$(TRT_BINDINGS)" | cksum | cut -d' ' -f1)

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

install: $(STAMP) $(TRT_STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitmerge demo

test: $(STAMP) $(TRT_STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP) $(TRT_STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) $(TRT_STAMP)
	$(PY) -m pytest -q

mutate: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,mutate]"
	$(PY) -m mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(PY) -m mutmut results

bench: $(STAMP)
	$(PY) bench/bench_ort.py

clean:
	rm -rf $(VENV) vitmerge-demo .pytest_cache mutants
