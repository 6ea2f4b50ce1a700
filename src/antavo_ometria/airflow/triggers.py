"""The asynchronous half of the deferrable event sensor: it waits in Airflow's triggerer, not a worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseHook
from airflow.triggers.base import BaseTrigger, TriggerEvent


class AntavoEventTrigger(BaseTrigger):
    """Polls Antavo's event feed (one read for every rule) until an event after `since[its action]` appears that is
    not in `settled[its action]` (the ids every rule of the action already pushed or decided on), or `deadline`
    (UTC; `timeout` seconds from now without it) passes. The deadline is absolute, so that a restarted triggerer
    keeps the quiet wait's end rather than starting it again."""

    def __init__(self, since: dict[str, str], antavo_conn_id: str = "antavo_default",
                 poll_interval: float = 60.0, timeout: float = 3600.0,
                 settled: dict[str, list[str]] | None = None, deadline: str | None = None):
        super().__init__()
        self.since, self.antavo_conn_id = dict(since), antavo_conn_id  # Antavo action → ISO time
        self.settled = {action: list(ids) for action, ids in (settled or {}).items()}  # Antavo action → event ids
        self.poll_interval = poll_interval
        self.deadline = deadline or (datetime.now(UTC) + timedelta(seconds=timeout)).isoformat()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("antavo_ometria.airflow.triggers.AntavoEventTrigger", {
            "since": self.since, "antavo_conn_id": self.antavo_conn_id, "poll_interval": self.poll_interval,
            "settled": self.settled, "deadline": self.deadline})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from antavo_ometria.airflow.hooks import antavo_config
        from antavo_ometria.antavo.client import AntavoClient
        from antavo_ometria.sync.events.delivery import read_feed

        client = AntavoClient(antavo_config(await BaseHook.aget_connection(self.antavo_conn_id)))
        since = {action: datetime.fromisoformat(moment) for action, moment in self.since.items()}
        earliest = min(self.since.values())
        deadline = datetime.fromisoformat(self.deadline)
        polls = 0
        while True:
            polls += 1
            try:
                feed = await asyncio.to_thread(read_feed, client, set(since), min(since.values()), datetime.now(UTC))
                found = feed.newer_than(since, self.settled)
            except Exception as exc:  # reported to the task, which fails with the reason
                yield TriggerEvent({"status": "error", "message": str(exc), "polls": polls,
                                    "retryable": getattr(exc, "retryable", True)})
                return
            if found:
                yield TriggerEvent({"status": "found", "found": len(found), "since": earliest, "polls": polls})
                return
            if datetime.now(UTC) >= deadline:
                yield TriggerEvent({"status": "timeout", "since": earliest, "polls": polls})
                return
            await asyncio.sleep(self.poll_interval)
