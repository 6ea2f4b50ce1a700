"""Airflow hooks: read the `antavo_default` and `ometria_default` Connections and build the clients.

Connection `antavo_default`: host = API base URL (`https://api.<env>.antavo.com`), login = API key,
password = API secret, extra `environment` = stack name for the signing scope, extra `read_api_url`
(derived from the environment when absent); optional extras `requests_per_second`, `concurrency`,
`timeout`, `verify_tls`.
Connection `ometria_default`: host = base URL (default `https://api.ometria.com`), password = API key;
optional extras `requests_per_second`, `timeout`, `verify_tls`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager

from airflow.sdk import BaseHook

from antavo_ometria.antavo.client import AntavoClient, AntavoConfig, api_url, read_api_url
from antavo_ometria.ometria.client import DEFAULT_BASE_URL, OmetriaClient, OmetriaConfig
from antavo_ometria.sync.store.state import StateStore, default_url

ANTAVO_KEYS_PAGE = "Antavo Management UI → Settings → API"
OMETRIA_KEYS_PAGE = "Ometria → Settings → API keys; a new key can take up to 10 minutes to become active"


def credential_fixes(antavo_conn_id: str = "antavo_default", ometria_conn_id: str = "ometria_default") -> dict[str, str]:
    """What to change when a service refuses its credentials: the connection and its field."""
    return {
        "Antavo": f"check connection {antavo_conn_id}: login = the API key, password = the API secret "
                  f"({ANTAVO_KEYS_PAGE}), extra.environment = the stack they belong to",
        "Ometria": f"check connection {ometria_conn_id}: password = the Ometria API key ({OMETRIA_KEYS_PAGE})",
    }


def _base_url(host: str | None, port: int | None, default: str) -> str:
    if not host:
        return default
    url = host if "://" in host else f"https://{host}"
    return f"{url}:{port}" if port and url.count(":") < 2 else url


def antavo_config(conn) -> AntavoConfig:
    """An Airflow Connection → the Antavo client's settings (also used by the deferrable trigger)."""
    extra = conn.extra_dejson
    environment = extra.get("environment")
    if not environment:
        raise ValueError(f"connection {conn.conn_id!r} needs extra.environment (the Antavo stack, e.g. st2); "
                         "it is part of the request-signing scope")
    for field, meaning in (("login", "the Antavo API key"), ("password", "the Antavo API secret")):
        if not getattr(conn, field):
            raise ValueError(f"connection {conn.conn_id!r} has no {field}: set it to {meaning} "
                             f"({ANTAVO_KEYS_PAGE})")
    return AntavoConfig(
        base_url=_base_url(conn.host, conn.port, api_url(environment)),
        api_key=conn.login,
        api_secret=conn.password,
        environment=environment,
        read_api_url=extra.get("read_api_url") or read_api_url(environment),
        requests_per_second=float(extra.get("requests_per_second", 20)),
        concurrency=int(extra.get("concurrency", 8)),
        timeout=float(extra.get("timeout", 30)),
        verify_tls=_flag(extra.get("verify_tls", True)),
    )


def _flag(value: object) -> bool:
    """A connection extra that means yes or no; text such as "false" (typed in the UI) counts as no."""
    return value.strip().lower() not in ("false", "no", "0", "off") if isinstance(value, str) else bool(value)


def ometria_config(conn) -> OmetriaConfig:
    """An Airflow Connection → the Ometria client's settings."""
    extra = conn.extra_dejson
    if not conn.password:
        raise ValueError(f"connection {conn.conn_id!r} has no password: set it to the Ometria API key "
                         f"({OMETRIA_KEYS_PAGE})")
    return OmetriaConfig(
        api_key=conn.password,
        base_url=_base_url(conn.host, conn.port, DEFAULT_BASE_URL),
        requests_per_second=float(extra.get("requests_per_second", 4)),
        timeout=float(extra.get("timeout", 30)),
        verify_tls=_flag(extra.get("verify_tls", True)),
    )


def env_connection_problem(conn_id: str) -> str | None:
    """Why an `AIRFLOW_CONN_<ID>` variable cannot be read: Airflow itself only says the connection "isn't
    defined" when its JSON is broken."""
    name = f"AIRFLOW_CONN_{conn_id.upper()}"
    value = os.environ.get(name)
    if value is None or not value.lstrip().startswith("{"):
        return None
    try:
        json.loads(value)
    except ValueError as exc:
        return f"{name} is not valid JSON ({exc}); fix the quoting of the exported value"
    return None


def _connection(hook: BaseHook, conn_id: str):
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return hook.get_connection(conn_id)
    except AirflowNotFoundException:
        problem = env_connection_problem(conn_id)
        if problem:
            raise ValueError(problem) from None
        raise


class _ClientHook(BaseHook):
    """Reads one Connection into a client's settings (`config_from`) and builds the client (`client`)."""

    conn_name_attr = "conn_id"
    conn_type = "http"
    config_from: Callable
    client: type

    def __init__(self, conn_id: str | None = None):
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def get_config(self):
        return type(self).config_from(_connection(self, self.conn_id))

    def get_conn(self):
        return self.client(self.get_config())


class AntavoHook(_ClientHook):
    default_conn_name = "antavo_default"
    hook_name = "Antavo"
    config_from = staticmethod(antavo_config)
    client = AntavoClient


class OmetriaHook(_ClientHook):
    default_conn_name = "ometria_default"
    hook_name = "Ometria"
    config_from = staticmethod(ometria_config)
    client = OmetriaClient


class StateStoreHook(BaseHook):
    """Connection `antavo_ometria_state` (optional): `extra.url` = any SQLAlchemy URL, or a `postgres`
    connection (host, port, login, password, schema = database). Without it: a SQLite file in
    $AIRFLOW_HOME (or $ANTAVO_OMETRIA_STATE_URL)."""

    conn_name_attr = "state_conn_id"
    default_conn_name = "antavo_ometria_state"
    conn_type = "generic"
    hook_name = "Antavo → Ometria state store"

    def __init__(self, state_conn_id: str = default_conn_name):
        super().__init__()
        self.state_conn_id = state_conn_id

    def get_url(self) -> str:
        return state_store_url(lambda conn_id: _connection(self, conn_id), self.state_conn_id)

    def get_conn(self) -> StateStore:
        """The store, not migrated: the schema is brought up to date once per deployment (`migrate.py`) and by the
        first task of a run whose schema is behind (`connect_or_fail`), not on every connection."""
        return StateStore(self.get_url())


def state_store_url(get_connection: Callable[[str], object], conn_id: str = StateStoreHook.default_conn_name) -> str:
    """The state store's SQLAlchemy URL: the connection's `extra.url`, or the URL the Postgres provider makes of a
    postgres connection; without the connection, the default (a SQLite file in $AIRFLOW_HOME)."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = get_connection(conn_id)
    except AirflowNotFoundException:
        problem = env_connection_problem(conn_id)
        if problem:
            raise ValueError(problem) from None
        return default_url()
    if conn.extra_dejson.get("url"):
        return conn.extra_dejson["url"]
    if conn.conn_type in ("postgres", "postgresql"):
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        # the database is the connection's schema, and `postgres` without one (not the login's name)
        url = PostgresHook(postgres_conn_id=conn_id, connection=conn, database=conn.schema or "postgres").sqlalchemy_url
        return url.render_as_string(hide_password=False)
    raise ValueError(f"connection {conn_id!r} needs extra.url (a SQLAlchemy URL) or type postgres")


def connect_or_fail(list_id: str, staging: bool = True) -> list[str]:
    """The connection check as a task: log one line per check; fail at once when a retry cannot help."""
    import logging

    from airflow.sdk.exceptions import AirflowNotFoundException

    from antavo_ometria.airflow.staging_location import StagingUnusable, check_staging, staging_root
    from antavo_ometria.sync.connect import ConnectionCheckFailed, check_connections

    with fail_fast_on(ValueError, AirflowNotFoundException, StagingUnusable):  # a connection missing or malformed,
        antavo, ometria, store = AntavoHook().get_conn(), OmetriaHook().get_conn(), StateStoreHook().get_conn()
        # a missing bucket or refused credentials stop the run before any request (the event triggers stage nothing)
        staged = [f"ok  staging: {check_staging(staging_root())}"] if staging else []
    store.ensure_schema()  # a run's first task brings a schema that is behind up to date (an upgrade)
    checks = check_connections(antavo, ometria, list_id, credential_fixes())
    lines = staged + [f"{'ok' if c.ok else 'FAILED'}  {c.name}: {c.detail}" for c in checks]
    for line in lines:
        logging.getLogger(__name__).info("%s", line)
    with fail_fast_on(ConnectionCheckFailed):
        if not all(c.ok for c in checks):
            raise ConnectionCheckFailed(checks)
    return lines


@contextmanager
def fail_fast_on(*errors: type[Exception]):
    """Fail the task at once on errors a retry cannot fix (a wrong file, an unreachable state store, data
    that fails the same way again) instead of using up its retries; an error that says it is retryable
    is left to Airflow's retries."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except errors as exc:
        if getattr(exc, "retryable", False):
            raise
        raise AirflowFailException(str(exc)) from None
