# `make demo` and `make test` set everything up on a fresh machine (see README).
PYTHON_VENV := .venv/bin/python

.PHONY: setup test lint demo env clean

setup:
	@bash tools/setup_env.sh

lint: setup
	$(PYTHON_VENV) -m ruff check objguided_d2 tools datasets tests

test: lint
	$(PYTHON_VENV) -m pytest tests

env: setup
	$(PYTHON_VENV) -m objguided_d2.env

demo: setup
	$(PYTHON_VENV) -m objguided_d2.env

clean:
	rm -rf .venv output
