# fhirbridge: the two commands of the README.
#   make demo   install into .venv, then run the whole stack with the shipped demo data
#               (the data is kept in .demo/ and reused; `make demo FRESH=1` starts over)
#   make test   install into .venv, then ruff (format check and lint), mypy and the whole test suite
#               (two pytest processes, a test file each at a time: most integration tests wait on
#               brokers and child processes, so two share the 2 cores well)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# the Node clients of tests/clients, pinned by their lock file (the tests run `npm ci` too when missing)
NODE_CLIENTS = tests/clients/node/node_modules/.fhirbridge-lock-sha256
# tests/browser drive Debian's Chromium by this path; Playwright never downloads a browser of its own
CHROMIUM = /usr/bin/chromium
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD = 1

.PHONY: demo test install lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fhirbridge needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fhirbridge demo $(if $(FRESH),--fresh)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

$(NODE_CLIENTS): tests/clients/node/package-lock.json
	cd tests/clients/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	sha256sum tests/clients/node/package-lock.json | cut -d' ' -f1 > $@

# Debian's package, once (skipped while $(CHROMIUM) exists): as root, else with sudo
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	else echo "make test needs Chromium: run 'apt-get install -y chromium' as root (no sudo here)" >&2; exit 1; fi; \
	set -x; $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
	test -x $(CHROMIUM)

test: $(STAMP) $(NODE_CLIENTS) $(CHROMIUM)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25 --ignore=tests/browser
	$(BIN)/pytest -q -p no:cacheprovider tests/browser

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[embedded,test,bench]'
	# C-CDA peers: their pins (lxml, typing-extensions) conflict with ours, so without their dependencies
	$(BIN)/python -m pip install --quiet --no-deps 'python-fhir-converter>=0.3,<0.4' 'ccda-to-fhir>=0.3,<0.4' \
		python-liquid xmltodict frozendict pyjson5 isodate
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .demo var .pytest_cache .mypy_cache .ruff_cache
