# The two commands of the README: `make demo` (the main job on its built-in default) and
# `make test`. Both create .venv and install torch==2.13.0 FIRST (a CPU build; an unpinned torch
# would pull a multi-GB CUDA build), then this package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,plot,text,vision]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mec-quant train

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mec_quant_plugin tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
