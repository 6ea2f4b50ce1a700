"""Command line: `python -m antavo_ometria_tools.cli COMMAND` (the Makefile wraps the common ones).

    run        run the contact sync DAG once with `airflow dags test` (`--dag events` for the event
               triggers), against the local sandbox unless AIRFLOW_CONN_ANTAVO_DEFAULT and
               AIRFLOW_CONN_OMETRIA_DEFAULT are set
    check      check the connections: a signed Antavo request, the Ometria API key, the configured list
    trace      one customer (Antavo id or email): what the mapping makes of her, what Ometria got, and why
    ui         the Airflow UI on this machine (`airflow standalone`), against the same accounts as `run`
    validate   check the mapping table, settings and trigger rules; list every problem with file, line, column
    fields     list the loyalty fields that can be mapped
    preview    show sample customers next to the Ometria records they become (read from Antavo when its
               connection is set, else the synthetic sandbox population; the first line says which)
    diff       show which rows and payload fields change between the committed mapping and an edited one
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from antavo_ometria.airflow import sqlite_metadata
from antavo_ometria.airflow.dag_defaults import CONTACTS_DAG, EVENTS_DAG
from antavo_ometria.problems import ConfigError
from antavo_ometria.sync.tables.mapping import NOT_OFFERED, catalog, load_contact_mapping
from antavo_ometria.sync.tables.settings import mappings_dir
from antavo_ometria.transport import RetryPolicy

PROJECT = Path(__file__).resolve().parents[2]
DAGS = {"contacts": CONTACTS_DAG, "events": EVENTS_DAG}
CONNECTIONS = ("antavo_default", "ometria_default", "antavo_ometria_state")
SANDBOX_STATE = "sandbox_state.db"  # the state store of local sandbox runs
SANDBOX_FILE = "sandbox.json"  # the sandbox's accounts between local runs
QUICK = RetryPolicy(attempts=2, backoff=0.5)  # a command answers in seconds, not after minutes of retries
LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T")  # a new log record: the traceback before it is over
CHAINING = ("Traceback", "During handling", "The above exception")
SHOWN = re.compile(r"\[antavo_ometria|\[DAG TEST\] (starting|end)|DagRun Finished")


def airflow_env() -> dict[str, str]:
    """Airflow's embedded default (SQLite, LocalExecutor) in the project's own folder."""
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(PROJECT / ".airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT / "dags"))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(PROJECT / "plugins"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    return {**sqlite_metadata.SETTING, **env}


def _airflow(args: list[str], env: dict[str, str], log_file: Path) -> int:
    """Run an airflow command; show progress lines, keep the full output in `log_file`."""
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    with log_file.open("a", encoding="utf-8") as log, subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            log.write(line)
            if SHOWN.search(line):
                print("  " + line.rstrip()[:220], flush=True)
    return process.returncode


def first_error(log: str) -> str | None:
    """The message of the first exception a task failed with, from an Airflow log: the last exception of the
    first traceback (with chained exceptions, the one raised last), without its module path, and with every
    line of a message that has several (a ConfigError lists each problem on a line of its own)."""
    lines = log.splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")), None)
    found = _last_exception(lines[start + 1:]) if start is not None else []
    if not found:
        return None
    name, _, message = found[0].partition(": ")
    first = message if message and re.fullmatch(r"[\w.]+", name) else found[0]
    return "\n".join([first, *found[1:]])


def _last_exception(traceback: list[str]) -> list[str]:
    """The last exception line of a traceback's lines (chained tracebacks included), then the lines its message
    goes on with; it ends at the next log record or another failure."""
    found: list[str] = []
    chained = continued = False
    for line in traceback:
        if LOG_LINE.match(line) or (line.startswith("Traceback") and not chained):
            break  # the next log record, or another failure
        if continued and line.strip() and line[0].isspace():
            found.append(line.rstrip())  # the exception's message goes on
            continue
        continued = False
        chained = line.startswith(CHAINING[1:]) or (chained and not line.startswith("Traceback"))
        if line and not line[0].isspace() and not line.startswith(CHAINING):
            found, continued = [line.rstrip()], True
    return found


def _connection_problems(env: dict[str, str], conn_ids: tuple[str, ...] = CONNECTIONS) -> list[str]:
    from antavo_ometria.airflow.hooks import env_connection_problem

    with _environ(env):
        return [p for p in (env_connection_problem(c) for c in conn_ids) if p]


class _environ:
    """os.environ as `env` for a block (Airflow reads its settings and connections from there)."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def __enter__(self):
        self.saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)

    def __exit__(self, *exc):
        os.environ.clear()
        os.environ.update(self.saved)


def _stored_connections(env: dict[str, str], conn_ids: tuple[str, ...] = CONNECTIONS[:2]) -> list[str]:
    """Which of these connections (the Antavo and Ometria ones) Airflow knows (its database, a secrets backend)."""
    with _environ(env):
        found = []
        for conn_id in conn_ids:
            try:
                _connection(conn_id)
                found.append(conn_id)
            except Exception:  # not defined, or no Airflow database yet
                pass
        return found


def _accounts(env: dict[str, str], args: argparse.Namespace):
    """Point `env` at real accounts (connections set in Airflow or its environment), a sandbox already
    running (`make sandbox`), or a sandbox started here, kept in $AIRFLOW_HOME between runs.

    Returns the sandbox started here (stopped by the caller), or None."""
    from antavo_ometria_tools.sandbox import Sandbox, running

    home = Path(env["AIRFLOW_HOME"])
    stored = _stored_connections(env)
    if stored:
        missing = [c for c in CONNECTIONS[:2] if c not in stored]
        if missing:
            raise SystemExit(f"connection {missing[0]} is not set, but {stored[0]} is: set both, or neither for "
                             "the sandbox")
        return None
    found = running()
    if getattr(args, "fresh", False):
        if found is not None:
            raise SystemExit("FRESH=1 starts the sandbox over, but one is running (make sandbox): stop it first")
        for name in (SANDBOX_STATE, SANDBOX_FILE):
            (home / name).unlink(missing_ok=True)
    # sandbox runs keep their own state store, whatever the environment says of a real one
    env.pop("AIRFLOW_CONN_ANTAVO_OMETRIA_STATE", None)
    env["ANTAVO_OMETRIA_STATE_URL"] = f"sqlite:///{home / SANDBOX_STATE}"
    env.setdefault("ANTAVO_OMETRIA_EVENT_WAIT_SECONDS", "10")  # not 14 minutes when no event comes
    env.setdefault("ANTAVO_OMETRIA_EVENT_POKE_SECONDS", "2")
    if found is not None:
        env.update(found)
        print("No real credentials set: using the sandbox already running on 127.0.0.1:8701 and :8702 (make sandbox)")
        return None
    if (home / SANDBOX_STATE).exists() and not (home / SANDBOX_FILE).exists():
        (home / SANDBOX_STATE).unlink()  # a state store without its sandbox would say contacts it never held
    sandbox = Sandbox(customers=args.customers, state_file=home / SANDBOX_FILE).start()
    env.update(sandbox.connections())
    print(f"No real credentials set: using the local sandbox ({len(sandbox.antavo.customers)} customers, kept in "
          f"{home / SANDBOX_FILE}; `make run FRESH=1` starts over)\n"
          f"  Antavo  {sandbox.antavo_url}\n  Ometria {sandbox.ometria_url}")
    return sandbox


def _print_reports(env: dict, home: Path, dag: str, dag_id: str, started: float) -> None:
    """What the run did, as its own report says (the contact run's, or each event rule's), and what the sandbox holds."""
    staged = env.get("ANTAVO_OMETRIA_STAGING_DIR") or str(home / "staging")
    reports = [] if "://" in staged else sorted((Path(staged) / dag_id).glob("*/report.json"),
                                                key=lambda p: p.stat().st_mtime)
    if reports and reports[-1].stat().st_mtime >= started:
        from antavo_ometria.sync.contacts.report import format_report

        print("\n" + format_report(json.loads(reports[-1].read_text())))
    if dag == "events":
        from antavo_ometria.sync.events.report import format_event_report

        print("\n" + format_event_report(event_summaries(env, dag_id, started)))
    holds = sandbox_holdings(env)
    if holds:
        print("\n" + holds)


def _fresh_log(env: dict[str, str], name: str) -> Path | None:
    """An empty log file in Airflow's home, or None (with the problems said) when a connection is not usable."""
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    problems = _connection_problems(env)
    if problems:
        print("\n".join(f"✗ {p}" for p in problems), file=sys.stderr)
        return None
    log_file = home / name
    log_file.write_text("")
    return log_file


def cmd_run(args: argparse.Namespace) -> int:
    env = airflow_env()
    log_file = _fresh_log(env, "last_run.log")
    if log_file is None:
        return 2
    home = log_file.parent
    dag_id = DAGS[args.dag]
    sandbox = _accounts(env, args)
    try:
        print("Preparing Airflow's database (SQLite) …", flush=True)
        if _airflow(["db", "migrate"], env, log_file):
            print(f"airflow db migrate failed; see {log_file}")
            return 1
        started = time.time()
        waits = f" (the sensor waits up to {env['ANTAVO_OMETRIA_EVENT_WAIT_SECONDS']} s for new events)" if (
            args.dag == "events" and env.get("ANTAVO_OMETRIA_EVENT_WAIT_SECONDS")) else ""
        print(f"Running {dag_id} with `airflow dags test`{waits} …", flush=True)
        conf = ["-c", args.conf] if args.conf else []
        code = _airflow(["dags", "test", *conf, dag_id], env, log_file)
        _print_reports(env, home, args.dag, dag_id, started)
        if code:
            error = first_error(log_file.read_text(encoding="utf-8"))
            print(f"\nThe run FAILED: {error or 'see the log'}", file=sys.stderr)
        print(f"Full Airflow log: {log_file}")
        return code
    finally:
        if sandbox is not None:
            sandbox.stop()


def sandbox_holdings(env: dict[str, str]) -> str | None:
    """What the Ometria sandbox the run pushed to holds now (None for a real account), read over its HTTP API."""
    from urllib.request import urlopen

    from antavo_ometria_tools.sandbox import OMETRIA_KEY

    try:
        ometria = json.loads(env.get("AIRFLOW_CONN_OMETRIA_DEFAULT") or "{}")
    except ValueError:
        return None
    if ometria.get("password") != OMETRIA_KEY:
        return None
    try:
        with urlopen(f"{ometria['host']}/_sandbox/stats", timeout=5) as answer:
            stats = json.load(answer)
        with urlopen(f"{ometria['host']}/_sandbox/events", timeout=5) as answer:
            types = Counter(e.get("event_type") for e in json.load(answer))
    except (OSError, ValueError):
        return None
    by_type = f" ({', '.join(f'{n} {t}' for t, n in sorted(types.items()))})" if types else ""
    return f"The Ometria sandbox now holds {stats['contacts']} contacts and {stats['events']} custom events{by_type}."


def event_summaries(env: dict[str, str], dag_id: str, started: float) -> list[dict]:
    """What each `deliver_<rule>` task of the newest run (started after `started`) returned, as the UI shows it;
    read in a process of its own, because Airflow fixes its database when first imported."""
    code = ("import json, sys; from antavo_ometria_tools.cli import read_event_summaries; "
            "print(json.dumps(read_event_summaries(sys.argv[1], float(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, dag_id, str(started)], env=env, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []


def read_event_summaries(dag_id: str, started: float) -> list[dict]:
    from datetime import UTC, datetime

    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.scalars(sa.select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(1)).first()
        if run is None or run.start_date is None or run.start_date < datetime.fromtimestamp(started, UTC):
            return []
        rows = session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=dag_id, key="return_value")).all()
        values = [XComModel.deserialize_value(r) for r in rows if r.task_id.startswith("deliver_")]
        summaries = [s for value in values for s in (value if isinstance(value, list) else [value])]  # one per rule
        return sorted(summaries, key=lambda summary: summary["rule"])


PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"  # where SimpleAuthManager writes the login
# Airflow's development login, which is what `make ui` is for; docker-compose.yaml ships the FAB auth manager
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
UI_STARTUP_SECONDS = 180  # standalone answers after about 25 s on two cores; a slow machine gets longer


def ui_command(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """`airflow standalone` with Airflow's embedded default in the project's folder (as `run` prepares it): the
    virtualenv's bin first on PATH, because standalone starts its components as `airflow …` by name."""
    bin_dir = str(Path(sys.executable).parent)
    env = {"AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER, **env,
           "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")])}
    return [str(Path(bin_dir) / "airflow"), "standalone"], env


def ui_login(env: dict[str, str]) -> tuple[str, Path]:
    """(URL, the file SimpleAuthManager writes the generated password to)."""
    port = env.get("AIRFLOW__API__PORT", "8080")
    passwords = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE") or str(Path(env["AIRFLOW_HOME"]) /
                                                                                    PASSWORDS_FILE)
    return f"http://localhost:{port}", Path(passwords)


def _wait_for_ui(url: str, process: subprocess.Popen, passwords: Path) -> str | None:
    """The login line once the UI answers; None when standalone ended or did not answer in time."""
    import requests

    deadline = time.monotonic() + UI_STARTUP_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/api/v2/monitor/health", timeout=2).ok and passwords.exists():
                logins = json.loads(passwords.read_text())
                return ", ".join(f"user {user!r} password {password!r}" for user, password in logins.items())
        except (requests.RequestException, ValueError):
            pass  # not up yet, or the password file is being written
        time.sleep(1)
    return None


def _stop(process: subprocess.Popen) -> None:
    """Standalone's whole process group: its scheduler, dag-processor, triggerer and API server."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM stops the UI as Ctrl-C does: standalone and the sandbox with it


def cmd_ui(args: argparse.Namespace) -> int:
    """The Airflow UI on this machine (`airflow standalone`), against the accounts `run` would use."""
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    env = airflow_env()
    log_file = _fresh_log(env, "ui.log")
    if log_file is None:
        return 2
    sandbox = _accounts(env, args)
    command, env = ui_command(env)
    url, passwords = ui_login(env)
    try:
        print("Preparing Airflow's database (SQLite) …", flush=True)
        if _airflow(["db", "migrate"], env, log_file) or _airflow(["pools", "set", "ometria_push", "1",
                                                                   "Ometria push API: account-wide rate limit"],
                                                                  env, log_file):
            print(f"Preparing Airflow failed; see {log_file}", file=sys.stderr)
            return 1
        print(f"Starting Airflow (standalone; its log: {log_file}) …", flush=True)
        with log_file.open("a", encoding="utf-8") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            login = _wait_for_ui(url, process, passwords)
            if login is None:
                print(f"Airflow did not start; see {log_file}", file=sys.stderr)
                return 1
            print(f"\nAirflow UI: {url}  (login: {login}; kept in {passwords})\n"
                  "The login is Airflow's SimpleAuthManager, for local development only; "
                  "docker-compose.yaml ships the FAB auth manager.\n"
                  f"DAGs from {env['AIRFLOW__CORE__DAGS_FOLDER']}; Browse → Antavo → Ometria sync opens the dashboard.\n"
                  "Ctrl-C stops it.", flush=True)
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            _stop(process)
    finally:
        if sandbox is not None:
            sandbox.stop()


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[None]:
    """os.environ pointed at the accounts for one command: the real ones, or the sandbox (stopped afterwards)."""
    env = airflow_env()
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    problems = _connection_problems(env)
    if problems:
        print("\n".join(f"✗ {p}" for p in problems), file=sys.stderr)
        raise SystemExit(2)
    sandbox = _accounts(env, args)
    try:
        with _environ(env):
            yield
    finally:
        if sandbox is not None:
            sandbox.stop()


def _connection(conn_id: str):
    from airflow.models.connection import Connection

    return Connection.get_connection_from_secrets(conn_id)


def cmd_check(args: argparse.Namespace) -> int:
    """One line per check, as the first task of each DAG runs them."""
    with _session(args):
        from antavo_ometria.airflow.hooks import antavo_config, credential_fixes, ometria_config
        from antavo_ometria.antavo.client import AntavoClient
        from antavo_ometria.ometria.client import OmetriaClient
        from antavo_ometria.sync.connect import check_connections

        try:
            mapping = load_contact_mapping(mappings_dir())
            checks = check_connections(AntavoClient(replace(antavo_config(_connection(CONNECTIONS[0])), retry=QUICK)),
                                       OmetriaClient(replace(ometria_config(_connection(CONNECTIONS[1])), retry=QUICK)),
                                       mapping.settings.list_id, credential_fixes())
        except (ConfigError, ValueError, LookupError) as exc:
            print(f"✗ setup       {exc}")
            return 2
    for check in checks:
        print(f"{'✓' if check.ok else '✗'} {check.name:10}  {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


TRACE_USAGE = "usage: make trace ID=<Antavo customer id or email>   (e.g. make trace ID=c00000001)"


def cmd_trace(args: argparse.Namespace) -> int:
    """Did Ometria get her, when, with what, and if not, why: read live from Antavo and the state store."""
    if not args.customer.strip():  # `make trace` without ID= passes ""
        print(TRACE_USAGE, file=sys.stderr)
        return 2
    with _session(args):
        import logging

        logging.disable(logging.WARNING)  # the trace is the output, not the libraries' progress
        from antavo_ometria.airflow.hooks import antavo_config, state_store_url
        from antavo_ometria.airflow.staging_location import staging_root
        from antavo_ometria.antavo.client import AntavoClient
        from antavo_ometria.sync.store.state import StateStore
        from antavo_ometria.sync.trace import format_trace, trace

        store = StateStore(state_store_url(_connection))
        store.ensure_schema()
        antavo = AntavoClient(replace(antavo_config(_connection(CONNECTIONS[0])), retry=QUICK))
        print(format_trace(trace(args.customer, store, load_contact_mapping(mappings_dir()), antavo, staging_root())))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from antavo_ometria.sync.events.rules import load_rules

    directory = Path(args.mappings)
    problems, warnings = [], []
    try:
        mapping = load_contact_mapping(directory, Path(args.file) if args.file else None)
    except ConfigError as exc:
        problems, warnings = exc.problems, exc.warnings
    try:
        rules = load_rules(directory)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        print(ConfigError(problems, warnings), file=sys.stderr)
        return 1
    for warning in mapping.warnings:
        print(f"warning: {warning}")
    print(f"OK: {len(mapping.fields)} mappings, {mapping.settings.payload_mode} mode, version {mapping.version}; "
          f"{len(rules)} event trigger rule(s)")
    return 0


def cmd_fields(args: argparse.Namespace) -> int:
    print(f"{'loyalty field':40} {'format':9} {'modes':10} module")
    for field in catalog():
        print(f"{field.path:40} {field.format:9} {' '.join(field.modes):10} {field.module}")
    print("\n* stands for a tier-structure ID, account ID, external ID field or custom property name.")
    for why in NOT_OFFERED.values():
        print(f"{why[0].upper()}{why[1:]}.")
    return 0


def _mapping_from(path: Path):
    """A mapping folder, or a contacts CSV read with the settings beside it (else the project's)."""
    if path.is_dir():
        return load_contact_mapping(path)
    settings_dir = path.parent if (path.parent / "settings.toml").exists() else mappings_dir()
    return load_contact_mapping(settings_dir, path)


def _committed_mappings(directory: Path) -> Path | None:
    """The mapping folder as committed in git (HEAD), copied to a temporary folder."""
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="mappings-head-"))
    for name in ("contacts.csv", "settings.toml"):
        shown = subprocess.run(["git", "show", f"HEAD:./{name}"], cwd=directory, capture_output=True)
        if shown.returncode:
            return None
        (target / name).write_bytes(shown.stdout)
    return target


def _sample(args: argparse.Namespace, status: str) -> tuple[list[dict], str]:
    """The customers a preview or diff maps, and which population they are: a file, a few read from Antavo
    when its connection is set (as `make run` and `make check` would use it), else the synthetic one."""
    import logging

    from antavo_ometria_tools.preview import load_customers

    logging.disable(logging.WARNING)  # the preview is the output, not the progress of Airflow and GX it loads
    if args.customers:
        customers = load_customers(Path(args.customers), args.count)
        return customers, f"{_customers(len(customers))} from {args.customers}"
    env = airflow_env()
    problem = _connection_problems(env, CONNECTIONS[:1])
    if problem:
        raise SystemExit(f"✗ {problem[0]}")
    if not _stored_connections(env, CONNECTIONS[:1]):
        customers = load_customers(None, args.count)
        return customers, (f"{_customers(len(customers))} of the synthetic sandbox population: no Antavo "
                           f"connection is set ({CONNECTIONS[0]})")
    from antavo_ometria.airflow.hooks import antavo_config, credential_fixes
    from antavo_ometria.antavo.client import READ_API_PAGE_LIMIT as PAGE
    from antavo_ometria.antavo.client import AntavoClient
    from antavo_ometria.transport import ApiError

    with _environ(env):
        try:
            client = AntavoClient(replace(antavo_config(_connection(CONNECTIONS[0])), retry=QUICK))
            customers = client.read_sample(args.count, status)
        except ValueError as exc:
            raise SystemExit(f"✗ setup       {exc}") from None
        except ApiError as exc:
            fix = f"; {credential_fixes()['Antavo']}" if exc.status == 401 else ""
            raise SystemExit(f"✗ Antavo      could not read sample customers: {exc}{fix}") from None
    capped = f"; {args.count} asked for, one request reads at most {PAGE:,}" if args.count > PAGE else ""
    requests = f"{client.requests_made} signed read-only request{'s' if client.requests_made != 1 else ''}"
    return customers, (f"{_customers(len(customers))} read from Antavo at {client.read_api} ({requests}: "
                       f"the oldest {status or 'any'} customers{capped})")


def _customers(count: int) -> str:
    return f"{count} customer{'s' if count != 1 else ''}"


def cmd_preview(args: argparse.Namespace) -> int:
    from antavo_ometria_tools.preview import render_preview

    try:
        mapping = _mapping_from(Path(args.mapping))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    customers, population = _sample(args, mapping.settings.customer_status)
    print(f"Sample: {population}\n")
    print(render_preview(customers, mapping))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from antavo_ometria_tools.preview import render_diff

    before_path = Path(args.before) if args.before else _committed_mappings(Path(args.after))
    if before_path is None:
        print("no committed mapping to compare with; pass --before", file=sys.stderr)
        return 1
    try:
        before, after = _mapping_from(before_path), _mapping_from(Path(args.after))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    customers, population = _sample(args, after.settings.customer_status)
    print(f"Sample: {population}")
    print(render_diff(customers, before, after))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="antavo-ometria", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the contact sync (or the event triggers) once")
    run.add_argument("--dag", choices=sorted(DAGS), default="contacts")
    run.add_argument("--conf", help='run parameters as JSON, e.g. \'{"dry_run": true}\' or \'{"full_resync": true}\'')
    run.add_argument("--fresh", action="store_true", help="start the local sandbox and its state store over")
    run.add_argument("--customers", type=int, default=1000, help="sandbox population size")
    run.set_defaults(func=cmd_run)
    check = commands.add_parser("check", help="check the connections and the configured Ometria list")
    check.add_argument("--customers", type=int, default=1000, help="sandbox population size")
    check.set_defaults(func=cmd_check)
    traced = commands.add_parser("trace", help="one customer: what Ometria got, when, and if not, why")
    traced.add_argument("customer", help="Antavo customer id or email")
    traced.add_argument("--customers", type=int, default=1000, help="sandbox population size")
    traced.set_defaults(func=cmd_trace)
    ui = commands.add_parser("ui", help="the Airflow UI on this machine (airflow standalone), with the sandbox "
                                        "unless connections are set")
    ui.add_argument("--customers", type=int, default=1000, help="sandbox population size")
    ui.set_defaults(func=cmd_ui)
    validate = commands.add_parser("validate", help="check the mapping files")
    validate.add_argument("--mappings", default=str(mappings_dir()))
    validate.add_argument("--file", help="a contacts mapping CSV other than <mappings>/contacts.csv")
    validate.set_defaults(func=cmd_validate)
    commands.add_parser("fields", help="list mappable loyalty fields").set_defaults(func=cmd_fields)
    preview = commands.add_parser("preview", help="sample customers next to their Ometria records")
    preview.add_argument("-n", "--count", type=int, default=3)
    preview.add_argument("--mapping", default=str(mappings_dir()), help="a mapping folder or contacts CSV")
    preview.add_argument("--customers", help="a JSON or NDJSON file of Antavo customers (default: read from Antavo "
                                             "when its connection is set, else the synthetic sandbox population)")
    preview.set_defaults(func=cmd_preview)
    diff = commands.add_parser("diff", help="what changes between two mappings")
    diff.add_argument("--before", help="mapping folder or CSV (default: the committed mapping)")
    diff.add_argument("--after", default=str(mappings_dir()), help="mapping folder or CSV (default: the working copy)")
    diff.add_argument("-n", "--count", type=int, default=200, help="sample customers")
    diff.add_argument("--customers", help="a JSON or NDJSON file of Antavo customers (default: read from Antavo "
                                          "when its connection is set, else the synthetic sandbox population)")
    diff.set_defaults(func=cmd_diff)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
