# The two commands of the quick start. Each installs what it needs first.
.PHONY: setup demo test lint

setup:
	@bash tools/setup.sh

demo: setup
	.venv/bin/python tools/demo.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test: lint
	.venv/bin/pytest
