# Two commands on a fresh clone:
#   make demo   creates .venv, installs the package, generates a story with the embedded model
#   make test   creates .venv, installs the package with its test extra, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python -m experiments.generate \
	  --checkpoint=assets/stories260K/stories260K.bin \
	  --tokenizer=assets/stories260K/tok512.bin \
	  --prompt="Once upon a time" --max_new_tokens=200 --temperature=0

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
