# Two commands on a fresh machine: `make run` (install, then sync once) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9
export GX_ANALYTICS_ENABLED := false

.PHONY: install migrate run events check trace ui keys test validate fields preview diff sandbox lock lint bench bench-events reliability clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode --quiet -r requirements.txt
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps --editable .   # the sync's own packages, from src/
	touch $@

migrate: install          ## bring the state store's schema up to date (once per deployment, e.g. after an upgrade)
	AIRFLOW_HOME=$(or $(AIRFLOW_HOME),$(CURDIR)/.airflow) $(BIN)/python -m antavo_ometria.airflow.migrate

RUN_OPTIONS = $(if $(FRESH),--fresh) $(if $(CONF),--conf '$(CONF)')

# sync once: the contact sync DAG via `airflow dags test` (the sandbox unless connections are set);
# FRESH=1 starts the local sandbox over, CONF='{"dry_run": true}' or CONF='{"full_resync": true}' sets run parameters
run: install
	$(BIN)/python -m antavo_ometria_tools.cli run $(RUN_OPTIONS)

events: install          ## the event-trigger DAG once, the same way
	$(BIN)/python -m antavo_ometria_tools.cli run --dag events $(RUN_OPTIONS)

check: install           ## connect: a signed Antavo request, the Ometria API key, the configured list
	$(BIN)/python -m antavo_ometria_tools.cli check

ui: install              ## the Airflow UI on http://localhost:8080 (airflow standalone; the sandbox unless connections are set)
	$(BIN)/python -m antavo_ometria_tools.cli ui

KEYS_FILE ?= .env
trace: install           ## one customer: make trace ID=<Antavo customer id or email>
	$(BIN)/python -m antavo_ometria_tools.cli trace "$(ID)"

keys:                    ## secrets for docker-compose (the UI admin's login among them), written once to .env (compose reads it); a key missing is added
	@$(PYTHON) -c "import base64, os, secrets, sys; path = sys.argv[1]; \
	text = open(path).read() if os.path.exists(path) else ''; \
	old = [line.split('=', 1)[0].strip().removeprefix('export ').strip() for line in text.splitlines() if '=' in line]; \
	new = {'_AIRFLOW_WWW_USER_USERNAME': 'airflow', '_AIRFLOW_WWW_USER_PASSWORD': secrets.token_urlsafe(18), \
	       'AIRFLOW_JWT_SECRET': secrets.token_hex(32), 'AIRFLOW_API_SECRET_KEY': secrets.token_hex(32), \
	       'AIRFLOW_FERNET_KEY': base64.urlsafe_b64encode(os.urandom(32)).decode(), \
	       'MINIO_ROOT_PASSWORD': secrets.token_urlsafe(24)}; \
	added = [k for k in new if k not in old]; \
	lines = ''.join(k + '=' + new[k] + chr(10) for k in added); \
	open(path, 'a').write((chr(10) if lines and text and not text.endswith(chr(10)) else '') + lines); \
	print('wrote ' + path + ': docker compose reads it' if not old else path + ' exists: keeping its keys (a new Fernet key could not read the secrets stored with the old one)' + ('; added ' + ', '.join(added) if added else ''))" "$(KEYS_FILE)"

test: install            ## every test, the files side by side (a file's tests stay on one worker: they share fixtures)
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)   # long files first (conftest.py)

validate: install        ## check include/mappings
	$(BIN)/python -m antavo_ometria_tools.cli validate

fields: install          ## list mappable loyalty fields
	$(BIN)/python -m antavo_ometria_tools.cli fields

preview: install         ## sample customers next to their Ometria records (N=3)
	$(BIN)/python -m antavo_ometria_tools.cli preview -n $(or $(N),3)

diff: install            ## what the edited mapping changes against the committed one
	$(BIN)/python -m antavo_ometria_tools.cli diff

sandbox: install         ## serve both sandbox APIs on 127.0.0.1:8701 (Antavo) and :8702 (Ometria)
	$(BIN)/python -m antavo_ometria_tools.sandbox --state-file $(or $(AIRFLOW_HOME),.airflow)/sandbox.json

lock: install            ## re-resolve requirements.in into the pinned requirements.txt
	$(BIN)/uv pip compile --python-version 3.11 requirements.in -o requirements.txt

lint: install            ## ruff, then the complexity budget (benchmarks/complexity.py)
	$(BIN)/ruff check src plugins dags tests benchmarks
	$(BIN)/python -m benchmarks.complexity

clean:
	rm -rf $(VENV) .airflow .pytest_cache

bench: install           ## benchmarks (100k and 1M customers, then reward claims → Ometria); writes BENCHMARKS.md
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.events

bench-events: install    ## 50 reward claims over 5 minutes on a real scheduler and triggerer: claim → Ometria latency
	$(BIN)/python -m benchmarks.events

reliability: install     ## every fault scenario, for real; writes the reliability table into BENCHMARKS.md
	$(BIN)/python -m benchmarks.reliability
