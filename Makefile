# meshkit: `make test` and `make demo` work as the first command on a fresh clone.
# The development environment is the lock (uv.lock), installed exactly by uv; `make lock`
# refreshes it and `make test-latest` tries the newest releases (CONTRIBUTING.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.meshkit-installed
SHOP_GEN := examples/shop/gen
LATEST := .venv-latest
PYTEST_ARGS ?=
# uv uses the interpreter of the venv; it never downloads one.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup proto test test-unit test-integration test-latest lock demo bench lint format typecheck clean help

help:
	@echo "make setup       - create .venv with exactly the locked versions (uv.lock), generate code"
	@echo "make test        - run the whole test suite"
	@echo "make demo        - run the example order saga end to end"
	@echo "make bench       - run the benchmarks against their peers (bench/results/*.json)"
	@echo "make proto       - regenerate code from proto/"
	@echo "make lint        - ruff, ruff format --check, mypy, and the generated-code check"
	@echo "make lock        - upgrade uv.lock to the newest releases pyproject.toml allows"
	@echo "make test-latest - the whole suite in a throwaway venv with the newest releases"
	@echo "make clean       - remove the venvs, generated code and caches"

# uv itself comes from PyPI, at the version the lock names, into the venv it manages
# (it is a dev dependency, so syncing keeps it).
$(UV):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
		"uv==$$($(PYTHON) -c 'import tomllib; print(next(p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"] if p["name"] == "uv"))')"

# --locked: fails when uv.lock no longer matches pyproject.toml (run `make lock`).
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev --quiet
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

lock: | $(UV)
	$(UV) lock --upgrade
	$(UV) sync --locked --extra dev
	@touch $(STAMP)
	$(PY) -m meshkit.cli gen proto --only meshkit --out . --package meshkit._pb --force
	@echo "uv.lock upgraded: run make test, then commit uv.lock (and meshkit/_pb if it changed)"

# The newest release of every dependency, in a venv of its own, as a user installing
# meshkit today would get them. Only the example shop's (untracked) code is regenerated:
# meshkit/_pb is what the package ships, so it is tested as committed.
test-latest: | $(UV)
	rm -rf $(LATEST)
	$(UV) venv --quiet --python $(PY) $(LATEST)
	$(UV) pip install --quiet --refresh --python $(LATEST)/bin/python -e '.[dev]'
	$(LATEST)/bin/python scripts/lockdiff.py
	$(LATEST)/bin/python -m meshkit.cli gen proto --only shop --out . --package examples.shop.gen \
		--descriptor-set $(SHOP_GEN)/shop.binpb
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(LATEST) $(SHOP_GEN) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
