# The two commands of the README: `make demo` (the main job on its built-in default) and
# `make test`. Both do their own set-up first: .venv with torch==2.13.0 installed FIRST (a CPU
# build; an unpinned torch would pull a multi-GB CUDA build), then this package with its dev extras
# and what the benchmark harness needs (the suite tests it), then real Fashion-MNIST (`make data`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo test lint clean

$(VENV)/.installed: pyproject.toml benchmarks/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,export,export-onnx]" -r benchmarks/requirements.txt
	touch $@

install: $(VENV)/.installed

# Real Fashion-MNIST (MIT) for the demo and the `data` tests: the Debian package when this machine
# allows it (root and apt-get). Otherwise the demo falls back to the Hub copy and, if that fails
# too, says how to get the files; the `data` tests are skipped with that reason.
data:
	@if [ -f $(FASHION_MNIST) ] || [ -n "$$MEC_QUANT_FASHION_MNIST_DIR" ]; then \
	  exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	  || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
	  || echo "Could not install dataset-fashion-mnist: the demo will try the Hub copy."; \
	else \
	  echo "Fashion-MNIST is not installed, and installing it needs root (sudo apt-get install -y" \
	       "dataset-fashion-mnist): the demo will try the Hub copy."; \
	fi

demo: install data
	$(VENV)/bin/mec-quant train

test: install data
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mec_quant_plugin tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
