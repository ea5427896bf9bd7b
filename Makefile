# The two commands of the quick start. Each installs what it needs first.
.PHONY: setup demo test lint

setup:
	@bash tools/setup.sh

demo: setup
	.venv/bin/python tools/demo.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

# The engine's tests once more on its pure-Python fallback (swapfs/engine/compiled.py).
PURE_TESTS = tests/engine/test_compiled.py tests/engine/test_volume.py tests/engine/test_model.py tests/engine/test_fsck.py \
	tests/engine/test_upgrade.py tests/engine/test_fallocate.py tests/engine/test_blocks.py tests/engine/test_reclaim.py

test: lint
	.venv/bin/pytest
	SWAPFS_PURE_PYTHON=1 .venv/bin/pytest $(PURE_TESTS)
