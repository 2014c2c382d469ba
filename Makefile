# Two commands on a fresh machine (they create/reuse the local virtual environment .venv):
#   make demo   quantize the bundled tiny model with a recipe and show what changed
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qpass-installed

.PHONY: demo test venv docs clean

venv: $(STAMP)

# constraints.txt pins torch to the CPU build on local disk (an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,onnx]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

docs: $(STAMP)
	$(PY) tools/gen_recipe_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
