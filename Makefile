# Set-up and entry points. `make demo` and `make test` work on a fresh machine (Python 3.11).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format bench clean

setup: $(STAMP)

# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build); the lock file
# (requirements.lock, regenerate with `make lock`) pins everything else.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -c requirements.lock -e ".[dev,bench]"
	touch $(STAMP)

demo: setup
	$(BIN)/constellation run --config configs/local_demo.yaml --local

test: setup
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

lock: setup
	$(BIN)/pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/' | grep -v '^constellation' > requirements.lock

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf .constellation .pytest_cache .ruff_cache
