# Two commands for a fresh machine: `make demo` and `make test`. Each creates
# .venv at the repo root when missing and installs what it needs into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sortline-installed

.PHONY: demo test bench clean systemd-tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/sortline score --config configs/demo.toml --seconds 30

# The service tests check the shipped units with systemd-analyze (it works without a
# running systemd); Debian's systemd package brings it.
systemd-tools:
	@command -v systemd-analyze >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends systemd; }

test: $(STAMP) systemd-tools
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/transport.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
