# Two commands for a fresh machine with nothing but Python:
#   make demo   set up and run the whole study on built-in data
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pins this machine needs (other versions are capped here); pyproject.toml stays loose.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test,hf]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/hessspec demo --out results/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check hessspec tests benchmarks scripts
	$(VENV)/bin/ruff format --check hessspec tests benchmarks scripts

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/hvp.py

clean:
	rm -rf $(VENV) build *.egg-info
