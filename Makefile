# meshkit: `make test` and `make demo` work as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meshkit-installed
SHOP_GEN := examples/shop/gen
PYTEST_ARGS ?=

.PHONY: setup proto test test-unit test-integration demo bench lint format typecheck clean help

help:
	@echo "make setup   - create .venv, install meshkit[dev], generate code"
	@echo "make test    - run the whole test suite"
	@echo "make demo    - run the example order saga end to end"
	@echo "make bench   - run the benchmarks against their peers (bench/results/*.json)"
	@echo "make proto   - regenerate code from proto/"
	@echo "make lint    - ruff, ruff format --check, mypy, and the generated-code check"
	@echo "make clean   - remove the venv, generated code and caches"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) proto

# meshkit's own messages are committed (the package needs them); the shop's are generated.
proto: $(STAMP)
	$(PY) -m meshkit.cli gen proto --only meshkit --out . --package meshkit._pb
	$(PY) -m meshkit.cli gen proto --only shop --out . --package examples.shop.gen \
		--descriptor-set $(SHOP_GEN)/shop.binpb

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest -m "integration or e2e" $(PYTEST_ARGS)

demo: setup
	$(PY) -m examples.shop.demo

# The gateway benchmarks drive meshkit and Envoy with wrk, from Debian's packages.
bench: setup
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) \
		|| echo "wrk is not installed: the gateway benchmarks will say so"
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m meshkit.cli gen proto --only meshkit --out . --package meshkit._pb --check

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(SHOP_GEN) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
