# Every target creates the virtualenv it needs; `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export GATEWAY_DEV_HS256_SECRET ?= dev-only-hs256-secret-not-for-production-use
export GATEWAY_ADMIN_TOKEN ?= dev-admin-token

.PHONY: install run test soak bench bench-ab lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@bash scripts/run-dev.sh

test: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/pytest -q -p no:randomly

soak: $(STAMP)
	$(BIN)/pytest -q -m soak

bench: $(STAMP)
	$(BIN)/python -m bench.run

# This tree's gateway against the one at REF (default: the previous commit), interleaved rounds.
bench-ab: $(STAMP)
	$(BIN)/python -m bench.ab $(or $(REF),HEAD~1)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench

clean:
	rm -rf $(VENV) var .pytest_cache
