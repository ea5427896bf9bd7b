# The two commands of the quick start. Each installs what it needs first.
.PHONY: setup demo test lint

setup:
	@bash tools/setup.sh

demo: setup
	.venv/bin/python tools/demo.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

# The engine's tests once more on its pure-Python fallback (swapfs/engine/compiled.py):
# all of tests/engine but the bit-flip campaigns, which test no more code that way.
PURE_TESTS = tests/engine --ignore=tests/engine/test_bitflip.py

test: lint
	.venv/bin/pytest
	SWAPFS_PURE_PYTHON=1 .venv/bin/pytest $(PURE_TESTS)
