# The two commands of the README:
#   make demo  - set everything up, then serve a small MoE model and generate from it
#   make test  - set everything up, then lint, type-check and run the test suite
SHELL := /bin/bash
VENV := .venv/bin
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: setup demo test lint typecheck pytest

setup:
	@bash .ci/setup dev

demo: setup
	$(VENV)/moeray serve --demo

lint:
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/clang-format --dry-run --Werror kernels/*.cpp kernels/*.h

typecheck:
	bash .ci/typecheck

pytest:
	$(VENV)/python -m pytest -q -p no:cacheprovider

test: setup lint typecheck pytest
