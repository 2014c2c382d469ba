# Two commands on a fresh machine (they create/reuse the local virtual environment .venv):
#   make demo   quantize the bundled tiny model with a recipe and show what changed
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qpass-installed

.PHONY: demo test test-all venv docs clean lock

venv: $(STAMP)

# constraints.txt is the dev/CI lock: every package pinned (torch to the CPU build on local disk; an unpinned
# torch pulls a multi-GB CUDA build). The build backend (setuptools) is pinned too: qpass is installed without
# build isolation, from the venv's own pinned setuptools. check_pins fails the install if anything resolved
# outside the lock (a new transitive dependency, a pin pip could not honour).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip setuptools
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[dev,onnx,export]"
	$(PY) tools/check_pins.py
	touch $(STAMP)

# Bump the pins on purpose: resolve pyproject's ranges afresh in a scratch venv (torch held at 2.13.0) and
# rewrite constraints.txt from it; then `make clean test` and commit the diff with what changed.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(LOCK_VENV)/bin/python -m pip install -q --no-build-isolation ".[dev,onnx,export]"
	$(LOCK_VENV)/bin/python tools/check_pins.py --write
	rm -rf $(LOCK_VENV) build

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" --durations=20

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q

docs: $(STAMP)
	$(PY) tools/gen_recipe_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
