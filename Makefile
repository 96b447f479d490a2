# hw — the two commands a new user needs: `make demo` and `make test`.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c


.PHONY: setup demo test test-rust test-py lint bench

setup:
	scripts/setup.sh

## Set everything up and run the main job on the bundled sample.
demo:
	venv=$$(scripts/setup.sh | tail -n 1)
	scripts/demo.sh "$$venv"

## Set everything up and run every test: Rust unit tests, lints, stub check, pytest (slow ones too).
test:
	venv=$$(scripts/setup.sh | tail -n 1)
	cargo test --quiet
	cargo fmt --check
	cargo clippy --quiet --all-targets --features python -- -D warnings
	"$$venv/bin/python" -m mypy.stubtest pycore._rust --allowlist scripts/stubtest-allowlist.txt
	"$$venv/bin/python" -m pytest -q

## Benchmarks (minutes; see bench/README.md). Figures go to bench/out/ and the README.
bench:
	venv=$$(scripts/setup.sh | tail -n 1)
	"$$venv/bin/python" bench/bench_bucket.py
	"$$venv/bin/python" bench/bench_spo.py
	"$$venv/bin/python" bench/spo_memory_budget.py
