# Every target creates the virtual environment it needs; only Python 3.10+ and PyPI are needed.
#   make demo   .venv-demo: ema_jax[demo] only (Flax, Orbax, scikit-learn, matplotlib, tqdm)
#   make test   .venv: ema_jax[dev] (tests, Keras for parity, benchmarks, docs tooling)
PYTHON ?= python3
VENV ?= .venv
DEMO_VENV ?= .venv-demo
BIN := $(VENV)/bin

.PHONY: test demo docs bench bench-smoke bench-models gpu-bench typecheck clean

# $(call install,DIR,EXTRAS): a virtual environment in DIR with ema_jax[EXTRAS], editable.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -e '.[$(2)]'
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml
	$(call install,$(VENV),dev)

$(DEMO_VENV)/.installed: pyproject.toml
	$(call install,$(DEMO_VENV),demo)

# The docs site is built (mkdocs build --strict, figures included) and read by tests/test_docs_site.py.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q
	$(BIN)/python -m mypy

typecheck: $(VENV)/.installed
	$(BIN)/python -m mypy

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/python examples/demo.py

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run.py

bench-smoke: $(VENV)/.installed
	$(BIN)/python benchmarks/run.py --smoke

# Real models (transformer LM, ResNet-style CNN; Linen, NNX, Keras, timm when installed):
# 6 min on 2 quiet cores (10 min with --rounds 31, as in docs/benchmarks.md).
bench-models: $(VENV)/.installed
	$(BIN)/python benchmarks/models.py

# On a GPU machine: every GPU figure of docs/benchmarks.md, under 8 minutes.
gpu-bench: $(VENV)/.installed
	PYTHON=$(BIN)/python bash benchmarks/gpu.sh

clean:
	rm -rf $(VENV) $(DEMO_VENV) build dist site *.egg-info
