# Two commands on a fresh machine:  make demo  |  make test
# Each creates .venv and installs the pinned dependencies (pyproject.toml + requirements.lock) when missing.

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= outputs/demo

.PHONY: install test demo lint bench clean-demo

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit("geoloc needs Python >= 3.11, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2" 2>&1 | sed '/^WARNING: Location .* is ignored/d'
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]' 2>&1 | sed '/^WARNING: Location .* is ignored/d'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

# The main job on the embedded default (a synthetic sample generated on first use, no download):
# sample -> webdataset shards -> baselines scored with evaluate.py -> $(DEMO)/results.md
demo: $(STAMP)
	$(PY) -m geoloc.data.sample
	$(PY) -m geoloc.shards data=sample data.split=train split=train out=$(DEMO)/shards
	$(PY) -m geoloc.shards data=sample data.split=test split=test out=$(DEMO)/shards
	$(PY) evaluate.py data=shards data.dir=$(DEMO)/shards data.split=test data.reference.source=sample \
		predictor=constant output_dir=$(DEMO)/constant
	$(PY) evaluate.py data=shards data.dir=$(DEMO)/shards data.split=test data.reference.source=sample \
		predictor=prior output_dir=$(DEMO)/prior
	$(PY) -m geoloc.report $(DEMO)/constant $(DEMO)/prior --out $(DEMO)/results.md
	@cat $(DEMO)/results.md

bench: $(STAMP)
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean-demo:
	rm -rf $(DEMO)
