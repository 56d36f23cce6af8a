# The two commands of the README:
#   make demo   installs Pli in .venv and runs a whole case through an embedded relay
#   make test   installs Pli and its test tools in .venv, then lints and runs every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup system-deps lint bench-quick

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/pli demo

# Reference tools the interoperability tests run against, from Debian's packages: the
# `age` tool, and Go with golang.org/x/mod (sumdb/note, sumdb/tlog) to verify our
# checkpoints and proofs with an independent implementation; nginx, for the TLS reverse proxy
# of deploy/ that tests/test_proxy.py runs in front of a relay. Installed when we may (root
# with apt-get, as in CI); otherwise those tests skip and say why. PostgreSQL, for the
# storage suite on both engines and the several-node tests: tests/_pg.py starts a throwaway
# cluster of its own on loopback with initdb and pg_ctl (asyncpg comes from pip as a wheel: no system library).
SYSTEM_PACKAGES := age golang-go golang-golang-x-mod-dev nginx postgresql
system-deps:
	@if ! command -v age >/dev/null 2>&1 || ! command -v go >/dev/null 2>&1 \
	    || ! { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	    || [ ! -d /usr/share/gocode/src/golang.org/x/mod/sumdb ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES)) >/dev/null; \
	  else echo "note: $(SYSTEM_PACKAGES) not all installed; their interoperability tests will be skipped"; fi; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Each benchmark once, small, so none of them rots (figures: bench/README.md).
bench-quick: setup
	$(BIN)/python bench/relay.py --quick
	$(BIN)/python bench/bundle.py --size 32M --rounds 1
	$(BIN)/python bench/transfer.py --quick
	$(BIN)/python bench/audit.py --quick

test: setup system-deps lint
	$(BIN)/pytest
	$(MAKE) --no-print-directory bench-quick
