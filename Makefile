# make demo  — set up and run the gateway's main job on the embedded default
# make test  — set up and run lint, type checks and the whole test suite
# make bench — set up and measure throughput, latency and memory
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TOOLS_STAMP := $(VENV)/.tools-stamp

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python venv module missing: installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/gatewayctl demo

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

# promtool (Debian's prometheus package), systemd-analyze and clamd, for the tests and
# the bench
$(TOOLS_STAMP): scripts/install-tools | $(STAMP)
	bash scripts/install-tools
	@touch $@

test: lint $(TOOLS_STAMP)
	$(BIN)/pytest --cov=gateway --cov-report=term --cov-fail-under=85

bench: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
