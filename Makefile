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
# all of tests/engine but the bit-flip campaigns, the counts of what an open reads
# (test_flatness) and the swap-with-discard runs (test_fallocate), which test no
# more code that way than test_volume's own punches and opens do.
PURE_TESTS = tests/engine --ignore=tests/engine/test_bitflip.py \
	--ignore=tests/engine/test_flatness.py --ignore=tests/engine/test_fallocate.py

test: lint
	.venv/bin/pytest
	SWAPFS_PURE_PYTHON=1 .venv/bin/pytest $(PURE_TESTS)
