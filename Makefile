# sphere: `make demo` runs the main job, `make test` runs the tests. Both install what they need.
.PHONY: setup demo test lint bench clean

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: .venv/.installed

demo: setup
	.venv/bin/sphere demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: setup lint
	.venv/bin/pytest

bench: setup
	.venv/bin/python benchmarks/bench_pull.py

clean:
	rm -rf demo-data var .pytest_cache
