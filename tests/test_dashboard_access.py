"""The sync dashboard shows personal data: Airflow's auth manager decides who may read it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.airflow


@pytest.fixture
def simple_auth_manager(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                       "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")
    from airflow.api_fastapi import app

    monkeypatch.setattr(app, "auth_manager", None, raising=False)
    return app.create_auth_manager()


def test_a_user_with_a_role_may_read_it_and_one_without_may_not(simple_auth_manager):
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    from antavo_ometria.airflow.dashboard import _allowed

    assert _allowed(SimpleAuthManagerUser(username="ana", role="viewer"))
    assert not _allowed(SimpleAuthManagerUser(username="guest", role=None))


def test_the_schema_is_migrated_once_not_on_every_page(tmp_path, monkeypatch):
    from antavo_ometria.airflow import dashboard
    from antavo_ometria.sync.store.state import StateStore

    monkeypatch.setenv("ANTAVO_OMETRIA_STATE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    migrations, migrate = [], StateStore.migrate
    monkeypatch.setattr(StateStore, "migrate", lambda self: migrations.append(1) or migrate(self))
    monkeypatch.setattr("antavo_ometria.airflow.dashboard.render", lambda store: "<html/>")
    monkeypatch.setattr(dashboard, "_STORES", {})
    for _ in range(3):
        dashboard._page()
    monkeypatch.setattr(dashboard, "_STORES", {})  # another API server process: a schema at head is left alone
    dashboard._page()
    assert len(migrations) == 1
