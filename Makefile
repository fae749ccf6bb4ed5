# make demo  — set up and run the gateway's main job on the embedded default
# make test  — set up and run lint, type checks and the whole test suite
# make bench — set up and measure throughput, latency and memory
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TOOLS_STAMP := $(VENV)/.tools-stamp

.PHONY: demo test bench lint clean install lock test-lowest

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
	bash scripts/install-tools --bench
	$(BIN)/python -m bench

# As root on Debian 12/13: /opt/gateway, /usr/bin links, unit, alert rules, documents
# (scripts/install --help). The configuration is left for the operator.
install:
	bash scripts/install

# requirements.lock: the exact, hash-checked dependencies scripts/install uses.
lock:
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q pip-tools
	.venv-lock/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
	rm -rf .venv-lock

# The test suite against the lowest versions pyproject.toml declares (uv's lowest-direct).
test-lowest:
	bash scripts/test-lowest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
