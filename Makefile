# Everything runs inside .venv; `make test` installs it first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# This machine keeps a CPU build of torch in its local wheel cache; elsewhere pip's normal torch is used.
TORCH_SPEC := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),torch==2.13.0,torch)

.PHONY: install test chaos unit lint browser demo study clean

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

# The TensorBoard page test drives Debian's chromium: installed when missing and apt can (CI runs as root).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "no chromium (needs root and apt): the TensorBoard browser test will be skipped"

test: lint browser
	$(PY) -m pytest -q -m "not chaos"

# The chaos tests alone, every case (`make test` runs all but those marked `chaos`): node losses, a killed
# driver and preemptions on a local multi-node cluster, with more node losses per sweep (CHAOS_KILLS),
# printing their timelines.
CHAOS_KILLS ?= 6
chaos: install
	CHAOS_KILLS=$(CHAOS_KILLS) $(PY) -m pytest -q -s tests/test_chaos.py

# A local Ray head (token authentication on) unless one is running; then the cluster check.
RAY_HEAD := . $(VENV)/bin/activate && export RAY_AUTH_MODE=token && \
	if ray status >/dev/null 2>&1; then echo "using the running Ray cluster"; else \
	  ray get-auth-token --generate >/dev/null && \
	  ray start --head --disable-usage-stats --dashboard-host=127.0.0.1 >/dev/null && \
	  echo "started a local Ray head: dashboard http://127.0.0.1:8265, stop it with 'ray stop'"; fi && \
	python -m ray_jobs.cli
STAMP_NOW := $(shell date +%Y%m%d-%H%M%S)

# The main job out of the box: the default gamma sweep submitted as a Ray job, then the analysis of what it
# wrote. DEMO_PROFILE=smoke for a quick look.
DEMO_PROFILE ?= cpu
DEMO_STORAGE ?= $(HOME)/ray_results
DEMO_NAME ?= gamma_sweep-$(DEMO_PROFILE)-$(STAMP_NOW)
demo: install
	@$(RAY_HEAD) && \
	ray job submit --working-dir . -- python sweeps/gamma_sweep.py --profile $(DEMO_PROFILE) \
	  --storage $(DEMO_STORAGE) --name $(DEMO_NAME) && \
	python -m analysis --experiment $(DEMO_STORAGE)/$(DEMO_NAME) && \
	echo "tables: $(DEMO_STORAGE)/$(DEMO_NAME)/results/  analysis: $(DEMO_STORAGE)/$(DEMO_NAME)/analysis/report.md" && \
	DATA=$$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['data_root'])" \
	  $(DEMO_STORAGE)/$(DEMO_NAME)/sweep.json) && \
	echo "use the best model (source $(VENV)/bin/activate first):" && \
	echo "  python -m ray_jobs.export --experiment $(DEMO_STORAGE)/$(DEMO_NAME) --best --out models/best" && \
	echo "  python -m ray_jobs.predict --model models/best --data-root $$DATA/singlecoil_val --out recon/val" && \
	echo "  python -m analysis.fastmri_evaluate --target-path $$DATA/singlecoil_val --predictions-path recon/val --challenge singlecoil"

# The paper's study as one Ray job (model comparison, gamma sweep, model costs, report). Continue an
# interrupted one with `make study STUDY_NAME=<its name> STUDY_ARGS=--resume`.
STUDY_PROFILE ?= cpu
STUDY_STORAGE ?= $(HOME)/ray_results
STUDY_NAME ?= paper_study-$(STUDY_PROFILE)-$(STAMP_NOW)
STUDY_ARGS ?=
study: install
	@$(RAY_HEAD) && \
	ray job submit --working-dir . -- python sweeps/paper_study.py --profile $(STUDY_PROFILE) \
	  --storage $(STUDY_STORAGE) --name $(STUDY_NAME) $(STUDY_ARGS) && \
	echo "report: $(STUDY_STORAGE)/$(STUDY_NAME)/report/report.md"

clean:
	rm -rf $(VENV) .pytest_cache
