# The two commands from the README.  Both prepare what they need first (scripts/bootstrap).
PY := .venv/bin/python

.PHONY: run test test-fast lint typecheck bootstrap

bootstrap:
	@scripts/bootstrap

# Boot the default guest: a stock Debian kernel with a busybox shell on the serial console.
run: bootstrap
	$(PY) -m pyvmm run $(ARGS)

# The fuzz targets (tests/unit/fuzz, tests/support/fuzzing.py) run for $PYVMM_FUZZ_SECONDS seconds
# each (8 targets: about 2.5 minutes in `make test`, 25 s in `make test-fast`); set it to override.
# pytest's summary lists the executions per target ("fuzz: TARGET N executions").
test: export PYVMM_FUZZ_SECONDS ?= 18
test-fast: export PYVMM_FUZZ_SECONDS ?= 3

# Lint, type-check, then the whole test suite on the real /dev/kvm and real guests.
test: bootstrap
	$(PY) -m ruff check src tests bench examples
	$(MAKE) --no-print-directory typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tests only (no guest boots, no VMM processes): under a minute.
test-fast: bootstrap
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

lint: bootstrap
	$(PY) -m ruff check src tests bench examples

# mypy over src/ (configuration in pyproject.toml), so the Protocols and layer interfaces are checked.
typecheck: bootstrap
	$(PY) -m mypy
