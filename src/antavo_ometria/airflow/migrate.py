"""Bring the state store's schema up to date, once per deployment: docker-compose's init service runs it,
and so does `make migrate`. The first task of each run also migrates a schema that is behind.

    python -m antavo_ometria.airflow.migrate
"""

from __future__ import annotations

import sys


def main() -> int:
    from airflow.models.connection import Connection

    from antavo_ometria.airflow.hooks import state_store_url
    from antavo_ometria.sync.store.state import StateStore

    store = StateStore(state_store_url(Connection.get_connection_from_secrets))
    store.ensure_schema()
    print(f"state store {store!r}: schema up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
