# usermgr: `make run` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS := api,postgres,crypto,test
STAMP := $(VENV)/.installed-stamp
RUFF_OPTS := --line-length 120 --target-version py311
RUFF_RULES := --select E,F,W,I,B,UP,SIM,RUF --ignore RUF001,RUF002,RUF003

.PHONY: install run test lint format sample bench loadtest mutate clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The main job on the embedded default: the sample users, from a copy of users.db.sample.
run: install
	test -e users.db || cp users.db.sample users.db
	$(BIN)/usermgr --db users.db list

# The whole suite, on SQLite and on a PostgreSQL server the test session starts itself.
test: install
	$(BIN)/python -m pytest -n 2

lint: install
	$(BIN)/ruff check $(RUFF_OPTS) $(RUFF_RULES) usermgr tests bench
	$(BIN)/ruff format $(RUFF_OPTS) --check usermgr tests bench
	$(BIN)/mypy usermgr
	$(BIN)/hadolint Dockerfile

format: install
	$(BIN)/ruff check $(RUFF_OPTS) $(RUFF_RULES) --fix usermgr tests bench
	$(BIN)/ruff format $(RUFF_OPTS) usermgr tests bench

# Rebuild users.db.sample deterministically, through the service layer.
sample: install
	$(BIN)/python -m tests.build_sample users.db.sample

bench: install
	$(BIN)/python bench/run.py

# Load test (not part of `make test`): a throwaway PostgreSQL and `usermgr serve --workers 2` under
# logins, GET /users/me, admin writes and CLI import/disable at once for LOADTEST_SECONDS, then the
# rules checked; writes the "Load test" section of bench/RESULTS.md. Uses wrk when it is installed.
LOADTEST_SECONDS ?= 60
loadtest: install
	$(BIN)/python bench/loadtest.py --seconds $(LOADTEST_SECONDS)

# Mutation testing (not part of `make test`): mutmut over a seeded random sample of the mutants of
# the rule-holding modules ([mutmut] in setup.cfg), on the SQLite half of the suite; prints the score.
# MUTATE_SAMPLE=0 runs every mutant (hours); MUTATE_SEED=N repeats a sample.
MUTATE_SAMPLE ?= 200
MUTATE_SEED ?=
mutate: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m tests.mutation_sample --sample $(MUTATE_SAMPLE) $(if $(MUTATE_SEED),--seed $(MUTATE_SEED))

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache mutants test-artifacts
