# Two commands on a fresh machine:  make demo  |  make test
# Each creates .venv and installs the pinned dependencies (pyproject.toml + requirements.lock) when missing.

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= outputs/demo

.PHONY: install test test-formats demo lint bench clean-demo ocr browser serve

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit("geoloc needs Python >= 3.11, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2" 2>&1 | sed '/^WARNING: Location .* is ignored/d'
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]' 2>&1 | sed '/^WARNING: Location .* is ignored/d'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not formats"

# The ONNX export's and the served page's tests (marked formats; the browser test needs make browser): a suite
# of its own so that make test stays within 10 minutes
test-formats: $(STAMP)
	$(PY) -m pytest -q -m formats

# The web page on the demo's model (make demo first): http://127.0.0.1:8000/
serve: $(STAMP)
	@test -f $(DEMO)/train/checkpoints/best.ckpt || { echo "make serve shows the demo's model: run make demo first"; exit 1; }
	$(VENV)/bin/geoloc-serve --model $(DEMO)/train/checkpoints/best.ckpt --port $${PORT:-8000}

# Optional: headless Chromium and its driver for the served page's browser test (Debian packages, as root)
browser:
	@if [ "$$(id -u)" != 0 ]; then echo "make browser installs Debian packages: run it as root (sudo make browser)"; exit 1; fi
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null

lint: $(STAMP)
	$(PY) -m ruff check .

# The main job on the embedded default (a synthetic sample generated on first use, no download):
# sample -> shards -> geocells -> train a small model (about 10 minutes on 2 CPU cores) -> evaluate it and the
# baselines on the held-out split with evaluate.py -> $(DEMO)/results.md. Fails if the model does not
# beat the constant baseline. Run again, it resumes (a finished demo is not trained again); make clean-demo
# starts over.
SAMPLE_CSV = $$($(PY) -c 'from geoloc.data.sample import default_sample_root as d; print(d() / "sample.csv")')
EVERY_CELL = 100000  # candidates for the answer rule: all of the demo's cells (the expected GeoScore over every cell)
EVAL_TEST  = data=shards data.name=sample-test data.dir=$(DEMO)/shards data.split=test data.reference.source=sample progress=false

demo: $(STAMP)
	$(PY) -m geoloc sample
	$(PY) -m geoloc shards data=sample data.split=train split=train out=$(DEMO)/shards
	$(PY) -m geoloc shards data=sample data.split=test split=test out=$(DEMO)/shards
	$(PY) -m geocells.build points=$(SAMPLE_CSV) points_split=train out=$(DEMO)/cells.parquet \
		min_points=25 max_points=200
	$(PY) train.py experiment=demo cells=$(DEMO)/cells.parquet output_dir=$(DEMO)/train trainer.enable_progress_bar=false \
		ckpt_path=last
	$(PY) evaluate.py $(EVAL_TEST) predictor=model ckpt=$(DEMO)/train/checkpoints/best.ckpt output_dir=$(DEMO)/model \
		predictor.explain=true predictor.decode=geoscore predictor.candidates=$(EVERY_CELL)
	$(PY) -m geoloc export ckpt=$(DEMO)/train/checkpoints/best.ckpt out=$(DEMO)/model.pt
	$(PY) evaluate.py $(EVAL_TEST) predictor=constant output_dir=$(DEMO)/constant
	$(PY) evaluate.py $(EVAL_TEST) predictor=prior output_dir=$(DEMO)/prior
	$(PY) -m geoloc report $(DEMO)/model $(DEMO)/constant $(DEMO)/prior --out $(DEMO)/results.md \
		--require-better $(DEMO)/model $(DEMO)/constant
	@echo "Why (the first test photo's reasoning chain, $(DEMO)/model/explanations.jsonl):"
	@head -n 1 $(DEMO)/model/explanations.jsonl | $(PY) -c 'import json, sys; print(json.loads(sys.stdin.read())["text"])'

bench: $(STAMP)
	@for f in $(filter-out bench/bench_evidence.py bench/bench_precision.py bench/bench_onnx.py,$(sort $(wildcard bench/bench_*.py))) \
		bench/bench_evidence.py bench/bench_precision.py bench/bench_onnx.py; do \
		echo "== $$f"; $(PY) $$f || exit 1; done   # these three read the study's runs

clean-demo:
	rm -rf $(DEMO)

# Optional: Tesseract with a language pack per script the OCR stage names (geoloc/evidence/ocr.py), and the Noto
# fonts the OCR tests render signs in. Debian packages, installed as root; without them OCR uses RapidOCR and
# those tests skip, saying so.
OCR_PACKAGES = tesseract-ocr $(addprefix tesseract-ocr-,eng rus ell ara heb hin tha chi-sim jpn kor) \
	fonts-noto-core fonts-noto-cjk
ocr:
	@if [ "$$(id -u)" != 0 ]; then echo "make ocr installs Debian packages: run it as root (sudo make ocr)"; exit 1; fi
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(OCR_PACKAGES)
