# The two set-up commands of the README. Both install everything they need on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install system-deps kenlm lint docs

system-deps:  ## espeak-ng + flite synthesise the demo's corpus and the test speech
	@command -v espeak-ng >/dev/null 2>&1 && command -v flite >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq espeak-ng flite >/dev/null) || \
	    echo "warning: could not apt-get install espeak-ng flite; the PyPI espeakng-loader is used instead"; }

$(BIN)/python:
	$(PY) -m venv $(VENV)

# KenLM's lmplz (n-gram estimation) and build_binary for `hff-cache lm build`, compiled once from the kenlm
# source package on PyPI (no prebuilt binary exists there); skipped when both are already in the venv.
KENLM_VERSION ?= 0.3.0
KENLM_APT := cmake g++ make libboost-program-options-dev libboost-system-dev libboost-thread-dev \
  libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev

kenlm: $(BIN)/python  ## KenLM lmplz + build_binary into $(BIN)
	@if [ -x $(BIN)/lmplz ] && [ -x $(BIN)/build_binary ]; then exit 0; fi; \
	  dpkg -s $(KENLM_APT) >/dev/null 2>&1 || \
	    { (apt-get update -qq && apt-get install -y -qq $(KENLM_APT) >/dev/null) || \
	      echo "warning: could not apt-get install the KenLM build dependencies ($(KENLM_APT))"; }; \
	  set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  echo "building KenLM $(KENLM_VERSION) lmplz + build_binary (a few minutes, once)"; \
	  $(BIN)/pip download -q --no-deps --no-binary kenlm "kenlm==$(KENLM_VERSION)" -d "$$tmp"; \
	  tar -xzf "$$tmp"/kenlm-$(KENLM_VERSION).tar.gz -C "$$tmp"; \
	  { cmake -S "$$tmp"/kenlm-$(KENLM_VERSION) -B "$$tmp"/build -DCMAKE_BUILD_TYPE=Release && \
	    cmake --build "$$tmp"/build --target lmplz build_binary -j "$$(nproc)"; } >"$$tmp"/build.log 2>&1 || \
	    { tail -n 40 "$$tmp"/build.log; echo "error: the KenLM build failed (log above)"; exit 1; }; \
	  install -m 755 "$$tmp"/build/bin/lmplz "$$tmp"/build/bin/build_binary $(BIN)/

install: $(BIN)/python system-deps kenlm
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[whisper,decode,entropy,test]"

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

# The lent GPU machine has torch, transformers and typer but reaches no package index: carry the rest as
# wheels for its Python (3.12, x86-64). `bash benchmarks/gpu.sh` installs them from .gpu_wheels/.
GPU_WHEELS = zarr numcodecs donfig google-crc32c jiwer rapidfuzz soundfile soxr
gpu-wheels:  ## wheels benchmarks/gpu.sh needs on the GPU machine (carry .gpu_wheels)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu_wheels $(GPU_WHEELS)
