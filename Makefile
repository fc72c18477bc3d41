# Every target creates the virtualenv it needs; `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export GATEWAY_DEV_HS256_SECRET ?= dev-only-hs256-secret-not-for-production-use
export GATEWAY_ADMIN_TOKEN ?= dev-admin-token

.PHONY: install run test soak bench bench-ab lint format typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Ports: GATEWAY_LISTEN__PORT (8080), GATEWAY_ADMIN__PORT (9901), MOCK_PORT (8000), e.g.
# `GATEWAY_ADMIN__PORT=9911 make run`.
run: $(STAMP)
	@bash scripts/run-dev.sh

# pytest-randomly runs the tests in a new order each time; the seed is printed first, and
# `make test SEED=N` repeats that order (`$(BIN)/pytest -p no:randomly` runs them in file order).
test: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy gateway
	@seed=$${SEED:-$$($(BIN)/python -c 'import random; print(random.randrange(1 << 32))')}; \
	echo "test order: --randomly-seed=$$seed (make test SEED=$$seed repeats it)"; \
	$(BIN)/pytest -q --randomly-seed=$$seed

soak: $(STAMP)
	$(BIN)/pytest -q -m soak

bench: $(STAMP)
	$(BIN)/python -m bench.run

# This tree's gateway against the one at REF (default: the previous commit), interleaved rounds.
bench-ab: $(STAMP)
	$(BIN)/python -m bench.ab $(or $(REF),HEAD~1)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench

# `ruff format` rewrites the files; `make test` and `make lint` only check them.
format: $(STAMP)
	$(BIN)/ruff format gateway tests bench

# mypy --strict over the gateway package ([tool.mypy] in pyproject.toml); `make test` runs it too.
typecheck: $(STAMP)
	$(BIN)/mypy gateway

clean:
	rm -rf $(VENV) var .pytest_cache
