# The two commands of the README's quickstart:
#   make run    set up .venv, then `dvc repro` on the default dataset (real MNIST digits)
#   make test   the same set-up plus dev dependencies, then the test suite
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
# Exact versions known to work together here; torch first and exactly 2.13.0 (any other
# spec pulls gigabytes of CUDA wheels).
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# The venv's tools first. The offline/quiet environment (telemetry off, start-up budgets) is set in
# one place, aigc/environment.py: every python entry point applies it, and tools started here
# directly run under `python -m aigc.environment`.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
WITH_ENV := python -m aigc.environment

.PHONY: help run test test-fast ui bench docs install install-dev dvc-init serve retrain schedule services services-down plots-template

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing aigc and its pinned dependencies into $(VENV) (first time: ~3 min)"
	@$(PIP) torch==2.13.0 $(QUIET_PIP)
	@$(PIP) -e . $(QUIET_PIP)
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@$(PIP) -e '.[dev]' $(QUIET_PIP)
	@touch $@

install: $(VENV)/.installed plots-template  ## create .venv and install aigc (pinned)
install-dev: $(VENV)/.installed-dev plots-template

# `dvc plots show` offline: these builds, fetched from the npm registry once and inlined into
# one HTML page (pipeline/plots_template.py), instead of DVC's CDN script tags. Needs npm; where
# it is absent the step says so and DVC keeps its default (online) page.
VEGA_PACKAGES := vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
PLOTS_TEMPLATE := .vendor/plots/template.html
$(PLOTS_TEMPLATE): Makefile pipeline/plots_template.py $(VENV)/.installed
	@rm -rf .vendor/npm && mkdir -p .vendor/npm
	@npm pack --silent --pack-destination .vendor/npm $(VEGA_PACKAGES) >/dev/null
	@$(PY) -m pipeline.plots_template .vendor/npm $@

plots-template:  ## vendor vega/vega-lite/vega-embed from npm into .vendor/ for offline `dvc plots show`
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(PLOTS_TEMPLATE); \
	else echo "npm not found: dvc plots show will load vega from its CDN (install npm, then make plots-template)"; fi

dvc-init:
	@test -d .dvc || dvc init -q
	@grep -qs "analytics = false" .dvc/config || dvc config core.analytics false
	@grep -qs "check_update = false" .dvc/config || dvc config core.check_update false
	@if test -f $(PLOTS_TEMPLATE); then dvc config --local plots.html_template ../$(PLOTS_TEMPLATE); fi

run: install dvc-init  ## train on the default data: dvc repro (only what changed runs)
	python -m aigc.services.prefect_server dvc repro

test: install-dev dvc-init  ## the whole test suite, end-to-end runs included
	pytest -n 2 --dist loadfile --durations=15  # two workers, one test file each at a time (pytest-xdist)

test-fast: install-dev  ## the fast tests only (no end-to-end runs)
	pytest -n 2 --dist loadfile -m "not slow"

docs: install-dev  ## build the reference site offline into site/ (MkDocs, --strict: a broken link fails)
	$(WITH_ENV) mkdocs build --strict -d site
	@echo "docs: open site/index.html"

bench: install  ## speed and overhead figures -> reports/benchmarks/ (~5 min)
	python -m aigc_bench

ui: install  ## open the MLflow UI on http://127.0.0.1:5000 for the local store
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the model-training view)"
	$(WITH_ENV) mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

serve: install  ## serve the champion on http://127.0.0.1:5001 (POST /invocations; README)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} $(WITH_ENV) mlflow models serve \
		-m models:/aigc-generator@champion --env-manager local --host 127.0.0.1 --port 5001

retrain: install dvc-init  ## retrain once: dvc repro under the retraining lock, then the registry's decision
	python -m pipeline.retrain run

CRON ?= 0 3 * * 1
schedule: install dvc-init  ## retrain on a cron schedule (CRON="0 3 * * 1"), until Ctrl-C
	python -m pipeline.retrain serve --cron "$(CRON)"

services: install  ## start PostgreSQL + an MLflow server on it + a Prefect server, on loopback, over TLS with a local CA (docs/team.md)
	python -m aigc.services up

services-down: install  ## stop what `make services` started (the data stays in .services/)
	python -m aigc.services down
