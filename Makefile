# cosmos3-serve: two commands.
#   make serve   installs (first time), writes the built-in tiny checkpoint, serves it on localhost
#   make test    installs (first time), runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TINY := build/tiny-checkpoint
HOST ?= 127.0.0.1
PORT ?= 8000
MODELOPT_VERSION := 0.47.0
.PHONY: install serve test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/cpu/install_torchvision.py deploy/cpu/cosmos3_torchvision_shim.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[cpu,test,quantize]'
	$(BIN)/python -m pip install --no-deps nvidia-modelopt==$(MODELOPT_VERSION)
	$(BIN)/python deploy/cpu/install_torchvision.py
	touch $@

$(TINY)/model_index.json: $(VENV)/.installed
	$(BIN)/cosmos3-serve make-tiny $(TINY) --seed 0 --vocab compact --action

serve: $(VENV)/.installed $(TINY)/model_index.json
	$(BIN)/cosmos3-serve serve $(TINY) --host $(HOST) --port $(PORT) --precision fp32

test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build
