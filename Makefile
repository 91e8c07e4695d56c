# sphere: `make demo` runs the main job, `make test` runs the tests. Both install what they need.
.PHONY: setup demo test lint typecheck bench chaos clean

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: .venv/.installed

demo: setup
	.venv/bin/sphere demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# mypy over every package, tests and benchmarks ([tool.mypy] in pyproject.toml): no errors.
typecheck: setup
	.venv/bin/mypy

test: setup lint typecheck
	.venv/bin/pytest -n 3 --dist loadfile

bench: setup
	.venv/bin/python benchmarks/bench_pull.py

# Every fault of issue 19 against real peers (not part of `make test`, which runs shorter
# versions in tests/test_chaos.py): a table of instances expected / stored / duplicated and
# the time to recover. `make chaos ARGS=node-killed` runs one.
chaos: setup
	.venv/bin/python -m harness.chaos $(ARGS)

clean:
	rm -rf demo-data var .pytest_cache
