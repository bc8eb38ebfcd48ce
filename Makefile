# The two set-up commands of the README:
#   make demo   installs into .venv and pre-trains OCL on the CPU for a few minutes
#   make test   installs into .venv and runs the test suite
# For the inner loop (CONTRIBUTING.md, not a set-up command):
#   make check      the fast tier: no slow, distributed, slurm, bench or gpu tests (under 2 minutes)
#   make test-long  the opt-in `long` tests make test leaves out (minutes each)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DATA_DIR ?= data/fashion-mnist-wds

.PHONY: demo test test-long check install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torchvision (needed by timm) must be the build that matches torch.
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m scale.demo --output-dir $(DEMO_DIR) --data-dir $(DATA_DIR)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not long" tests

test-long: $(STAMP)
	$(PY) -m pytest -q -m long tests

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not (slow or distributed or slurm or bench or gpu)" tests

clean:
	rm -rf $(VENV) runs
