# The two commands from the README.  Both prepare what they need first (scripts/bootstrap).
PY := .venv/bin/python

.PHONY: run test lint bootstrap

bootstrap:
	@scripts/bootstrap

# Boot the default guest: a stock Debian kernel with a busybox shell on the serial console.
run: bootstrap
	$(PY) -m pyvmm run $(ARGS)

# Lint, then the whole test suite on the real /dev/kvm and real guests.
test: bootstrap
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest $(PYTEST_ARGS)
