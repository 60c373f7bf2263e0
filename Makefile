# Two commands for a fresh machine: `make demo` and `make test`. Each creates
# .venv at the repo root when missing and installs what it needs into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sortline-installed

.PHONY: demo test bench clean systemd-tools prometheus-tools

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

# The alert rules are checked with promtool (`promtool check rules`, `promtool test rules`). It is one
# static binary in Debian's prometheus package: taken out of the package into the venv, without
# installing the package (which would pull its web UI and start a Prometheus server under systemd).
prometheus-tools: $(STAMP)
	@command -v promtool >/dev/null || test -x $(VENV)/bin/promtool || { \
	  cd $(VENV) && { apt-get download -q prometheus || { apt-get update -q && apt-get download -q prometheus; }; } \
	  && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > bin/promtool \
	  && chmod +x bin/promtool && rm prometheus_*.deb; }

test: $(STAMP) systemd-tools prometheus-tools
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/transport.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
