"""Connection arguments for Airflow's metadata database on the embedded default (SQLite).

SQLite lets one writer in at a time and, by default, gives up after 5 seconds. Under a busy scheduler a
backfill created from the UI or the REST API can then fail half-way: Airflow deletes the runs it had
inserted while the scheduler is already scheduling them, and the scheduler exits. Waiting up to a minute
for the lock avoids it. Set through `AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS`; the arguments are empty
unless Airflow's resolved metadata database is SQLite (a PostgreSQL driver refuses `timeout`).
"""

from airflow.configuration import conf

CONNECT_ARGS = {"timeout": 60} if conf.get("database", "sql_alchemy_conn").startswith("sqlite") else {}
SETTING = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{__name__}.CONNECT_ARGS"}
