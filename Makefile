# The two commands of the quick start. Each installs what it needs first.
.PHONY: setup demo test lint

setup:
	@bash tools/setup.sh

demo: setup
	.venv/bin/python tools/demo.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

# The engine's tests once more on its pure-Python fallback (swapfs/compiled.py).
PURE_TESTS = tests/test_compiled.py tests/test_volume.py tests/test_model.py tests/test_fsck.py \
	tests/test_upgrade.py tests/test_fallocate.py tests/test_blocks.py tests/test_reclaim.py

test: lint
	.venv/bin/pytest
	SWAPFS_PURE_PYTHON=1 .venv/bin/pytest $(PURE_TESTS)
