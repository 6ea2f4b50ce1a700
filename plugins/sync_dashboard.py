"""Airflow UI plugin: the Antavo → Ometria sync dashboard (Browse → "Antavo → Ometria sync").

Serves `antavo_ometria.airflow.dashboard` at /sync-dashboard/ inside the api-server, behind Airflow's own
login and its auth manager's permissions, and adds it to the UI's navigation.
"""

from __future__ import annotations

import asyncio

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse

DAG_IDS = ("antavo_ometria_contacts", "antavo_ometria_events")

def _state_url() -> str:
    """The `antavo_ometria_state` connection when there is one, as the DAGs use it; else the default."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from antavo_ometria.airflow.hooks import env_connection_problem
    from antavo_ometria.sync.state import default_url, url_from_connection

    try:
        return url_from_connection(Connection.get_connection_from_secrets("antavo_ometria_state"))
    except AirflowNotFoundException:
        problem = env_connection_problem("antavo_ometria_state")
        if problem:
            raise ValueError(problem) from None
        return default_url()


_STORES: dict = {}  # one state store (and one schema check) per URL for the life of the API server


def _store():
    from antavo_ometria.sync.state import StateStore

    url = _state_url()
    if url not in _STORES:
        store = StateStore(url)
        store.ensure_schema()
        _STORES[url] = store
    return _STORES[url]


def _page() -> str:
    from antavo_ometria.airflow.dashboard import render

    return render(_store())


def _trace_page(query: str) -> str:
    """One customer, read live from Antavo when its connection is set (else from the staging files)."""
    from dataclasses import replace

    from airflow.models.connection import Connection

    from antavo_ometria.airflow.dashboard import render_trace
    from antavo_ometria.airflow.hooks import antavo_config
    from antavo_ometria.antavo.client import AntavoClient
    from antavo_ometria.sync.mapping import load_contact_mapping
    from antavo_ometria.sync.settings import mappings_dir
    from antavo_ometria.sync.staging import staging_root
    from antavo_ometria.sync.trace import trace
    from antavo_ometria.transport import RetryPolicy

    if not query:
        return _page()
    try:  # a page should answer in seconds: two quick tries, then the staging files
        config = antavo_config(Connection.get_connection_from_secrets("antavo_default"))
        antavo = AntavoClient(replace(config, retry=RetryPolicy(attempts=2, backoff=0.5), timeout=10))
    except Exception:  # not set, or not usable: the page says where its data came from
        antavo = None
    return render_trace(trace(query, _store(), load_contact_mapping(mappings_dir()), antavo, staging_root()))


def _allowed(user) -> bool:
    """The page shows held records with emails and phone numbers: the same right as reading both DAGs' task logs."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    manager = get_auth_manager()
    return all(manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.TASK_LOGS,
                                         details=DagDetails(id=dag_id), user=user) for dag_id in DAG_IDS)


def _create_app() -> FastAPI:
    app = FastAPI(title="Antavo → Ometria sync dashboard")

    async def authorise(request: Request) -> None:
        # Airflow's own login: the bearer token, or the UI's session cookie (imported here, not when the
        # plugin is loaded, so task processes that load plugins do not pay for the API server's modules)
        from airflow.api_fastapi.core_api.security import resolve_user_from_token

        header = request.headers.get("Authorization", "")
        user = await resolve_user_from_token(header[7:] if header.lower().startswith("bearer ") else
                                             request.cookies.get("_token"))
        if not _allowed(user):
            raise HTTPException(403, "reading the sync dashboard needs access to the task logs of "
                                     + " and ".join(DAG_IDS))

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> str:
        await authorise(request)
        return await asyncio.to_thread(_page)

    @app.get("/trace", response_class=HTMLResponse)
    async def customer_trace(request: Request, q: str = "") -> str:
        await authorise(request)
        return await asyncio.to_thread(_trace_page, q.strip())

    return app


class SyncDashboardPlugin(AirflowPlugin):
    name = "antavo_ometria_sync_dashboard"
    fastapi_apps = [{"app": _create_app(), "url_prefix": "/sync-dashboard", "name": "Antavo → Ometria sync"}]
    external_views = [{
        "name": "Antavo → Ometria sync",
        "href": "sync-dashboard/",
        "destination": "nav",
        "category": "browse",
        "url_route": "antavo-ometria-sync",
    }]
