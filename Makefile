# `make test` and `make install` work on a fresh machine: they create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test serve bento default-model clean browser
HOST ?= 127.0.0.1
PORT ?= 3000

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	# torchattacks runs `capt eval --attack` apgd-ce/apgd-t/fab-t/square/autoattack (and is the tests' independent
	# PGD reference). --no-deps: it pins requests~=2.25.1, which it never imports; what it does import (torch,
	# numpy, scipy, tqdm) comes from requirements*.txt and pyproject.toml.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchattacks==3.5.1
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# tests/test_ui_browser.py drives Debian's chromium headless through chromedriver; the HTTP benchmarks (and
# tests/test_wrk_driver.py) load the server with Debian's wrk. Installed here when missing and possible (root
# with apt-get); never fails the build: without them those tests skip and say why.
BROWSER_PACKAGES := chromium chromium-driver wrk
browser:
	@if command -v chromedriver >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing $(BROWSER_PACKAGES) for tests/test_ui_browser.py and tests/test_wrk_driver.py"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1; } \
	    || echo "could not install $(BROWSER_PACKAGES): tests/test_ui_browser.py and tests/test_wrk_driver.py will skip"; \
	else \
	  echo "no chromium/chromedriver/wrk, and not root with apt-get: tests/test_ui_browser.py and tests/test_wrk_driver.py will skip"; \
	fi

# Serves the embedded default model (exported into the BentoML model store on first use).
serve: install
	HF_HUB_OFFLINE=1 $(PY) -m serving.prepare
	HF_HUB_OFFLINE=1 $(VENV)/bin/bentoml serve serving.service:Classifier --host $(HOST) --port $(PORT)

# Rebuilds the embedded default model from scratch (seeded): capt pretrain (~13 min on 2 idle cores), capt robustify
# (600 steps; 23 min on one shared core), CAPT tuning on the robust tower (~2 min), capt promote.
default-model: install
	HF_HUB_OFFLINE=1 $(PY) -m capt.default_model rebuild

bento: install
	HF_HUB_OFFLINE=1 $(PY) -m serving.prepare
	HF_HUB_OFFLINE=1 $(VENV)/bin/bentoml build

clean:
	rm -rf $(VENV) .pytest_cache
