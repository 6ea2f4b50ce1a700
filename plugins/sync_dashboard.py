"""Airflow UI plugin: the Antavo → Ometria sync dashboard (Browse → "Antavo → Ometria sync").

Serves `antavo_ometria.airflow.dashboard` at /sync-dashboard/ inside the api-server, behind Airflow's own
login and its auth manager's permissions, and adds it to the UI's navigation.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from antavo_ometria.airflow.dashboard import create_app


class SyncDashboardPlugin(AirflowPlugin):
    name = "antavo_ometria_sync_dashboard"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/sync-dashboard", "name": "Antavo → Ometria sync"}]
    external_views = [{
        "name": "Antavo → Ometria sync",
        "href": "sync-dashboard/",
        "destination": "nav",
        "category": "browse",
        "url_route": "antavo-ometria-sync",
    }]
