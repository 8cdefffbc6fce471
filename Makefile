# Every target creates its own virtual environment; only Python 3.10+ and PyPI are needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo docs bench bench-smoke bench-models gpu-bench typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/python -m mypy

typecheck: $(STAMP)
	$(BIN)/python -m mypy

demo: $(STAMP)
	$(BIN)/python examples/demo.py

docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/run.py --smoke

# Real models (transformer LM, ResNet-style CNN; Linen, NNX, Keras): ~30 min on 2 busy cores.
bench-models: $(STAMP)
	$(BIN)/python benchmarks/models.py

# On a GPU machine: every GPU figure of docs/benchmarks.md, under 8 minutes.
gpu-bench: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/gpu.sh

clean:
	rm -rf $(VENV) build dist site *.egg-info
