# The two set-up commands of the README:
#   make demo   installs into .venv and pre-trains OCL on the CPU for a few minutes
#   make test   installs into .venv and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DATA_DIR ?= data/fashion-mnist-wds

.PHONY: demo test install clean

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
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
