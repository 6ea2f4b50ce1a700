"""Connection arguments for Airflow's metadata database on the embedded default (SQLite).

SQLite lets one writer in at a time and, by default, gives up after 5 seconds. Under a busy scheduler a
backfill created from the UI or the REST API can then fail half-way: Airflow deletes the runs it had
inserted while the scheduler is already scheduling them, and the scheduler exits. Waiting up to a minute
for the lock avoids it. Set through `AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS` (`SETTING`); the arguments
are empty unless Airflow's resolved metadata database is SQLite (a PostgreSQL driver refuses `timeout`).
"""

from __future__ import annotations

SETTING = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{__name__}.CONNECT_ARGS"}


def __getattr__(name: str) -> dict:
    """`CONNECT_ARGS`, decided when Airflow asks for it (while it sets up its database), from its configuration:
    importing Airflow here, before, would make it ask for them while this module is still being imported."""
    if name != "CONNECT_ARGS":
        raise AttributeError(name)
    from airflow.configuration import conf

    return {"timeout": 60} if conf.get("database", "sql_alchemy_conn").startswith("sqlite") else {}
