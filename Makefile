# The two commands: `make serve` runs the product, `make test` runs every test.
SHELL := /bin/bash
HOST ?= 127.0.0.1
PORT ?= 8000
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

.PHONY: install serve test test-fast lint format bench clean

# uv itself, where it is missing.
install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

serve: install
	$(UV) run --frozen ssd serve --host $(HOST) --port $(PORT)

test: install
	$(UV) run --frozen pytest

test-fast: install
	$(UV) run --frozen pytest -m "not slow"

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format: install
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

bench: install
	$(UV) run --frozen python bench/loss_bench.py
	$(UV) run --frozen python bench/train_bench.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache
