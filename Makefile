# Everything runs inside .venv; `make test` installs it first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# This machine keeps a CPU build of torch in its local wheel cache; elsewhere pip's normal torch is used.
TORCH_SPEC := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),torch==2.13.0,torch)

.PHONY: install test unit lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# fastMRI is the reference the tests compare against; its declared deps (Lightning, torchvision)
	# would break beside the CPU torch, so it is installed without them.
	$(PY) -m pip install --quiet --no-deps fastmri==0.3.0 runstats tqdm
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

unit: install
	$(PY) -m pytest -m "not slow" -q

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
