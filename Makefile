# The two commands of the README:
#   make demo   installs Pli in .venv and runs a whole case through an embedded relay
#   make test   installs Pli and its test tools in .venv, then lints and runs every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup system-deps lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/pli demo

# The `age` tool (Debian package) is the reference the interoperability tests run
# against. Installed when we may (root with apt-get, as in CI); otherwise those tests
# skip and say why.
system-deps:
	@command -v age >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq age) >/dev/null; \
	  else echo "note: the 'age' tool is not installed; its interoperability tests will be skipped"; fi; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup system-deps lint
	$(BIN)/pytest
