# The two set-up commands of the README. Both install everything they need on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install system-deps lint docs

system-deps:  ## espeak-ng + flite synthesise the demo's corpus and the test speech
	@command -v espeak-ng >/dev/null 2>&1 && command -v flite >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq espeak-ng flite >/dev/null) || \
	    echo "warning: could not apt-get install espeak-ng flite; the PyPI espeakng-loader is used instead"; }

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python system-deps
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[whisper,test]"

demo: install  ## the main job: the offline demo
	$(BIN)/hff-cache demo --out demo

test: install  ## the test suite (what .ci/run runs)
	$(BIN)/ruff check hff_cache tests benchmarks pipelines
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 tests

lint:
	$(BIN)/ruff check hff_cache tests benchmarks pipelines
	$(BIN)/lint-imports

docs:  ## regenerate the CLI reference from the code
	$(BIN)/typer hff_cache.cli utils docs --name hff-cache --title "hff-cache command reference (generated)" \
	  --output docs/cli_reference.md
