"""Airflow UI plugin: the Antavo → Ometria sync dashboard (Browse → "Antavo → Ometria sync").

Serves `antavo_ometria.dashboard` at /sync-dashboard/ inside the api-server, behind Airflow's own
login, and adds it to the UI's navigation.
"""

from __future__ import annotations

import asyncio

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse


def _state_url() -> str:
    """The `antavo_ometria_state` connection when there is one, as the DAGs use it; else the default."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from antavo_ometria.state import default_url, url_from_connection

    try:
        return url_from_connection(Connection.get_connection_from_secrets("antavo_ometria_state"))
    except AirflowNotFoundException:
        return default_url()


def _page() -> str:
    from antavo_ometria.dashboard import render
    from antavo_ometria.state import StateStore

    store = StateStore(_state_url())
    store.migrate()
    return render(store)


def _create_app() -> FastAPI:
    app = FastAPI(title="Antavo → Ometria sync dashboard")

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> str:
        # Airflow's own login: the bearer token, or the UI's session cookie (imported here, not when the
        # plugin is loaded, so task processes that load plugins do not pay for the API server's modules)
        from airflow.api_fastapi.core_api.security import resolve_user_from_token

        header = request.headers.get("Authorization", "")
        await resolve_user_from_token(header[7:] if header.lower().startswith("bearer ") else
                                      request.cookies.get("_token"))
        return await asyncio.to_thread(_page)

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
