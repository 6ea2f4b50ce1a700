"""The other way to wake the event delivery, measured against the continuous DAG by `python -m benchmarks.events
--compare`: Airflow's event-driven scheduling, an Asset with an `AssetWatcher` whose trigger polls Antavo's event
feed in the triggerer and fires when a matching event appears; each firing updates the Asset, which schedules a
run of `deliver_events` (dags/antavo_ometria_events.py; this module is in the plugins folder, which Airflow puts
on the path of every component, so that the triggerer imports it as `antavo_feed_watcher`).

Only the fast path is built here (what latency measures): the watcher starts from the moment it starts, and its
position lives in memory, so a triggerer restart or an outage would need the scheduled catch-up the continuous DAG
has built in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseHook
from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)


class AntavoFeedWatcher(BaseEventTrigger):
    """Fires once per poll of Antavo's event feed that finds events of `actions` newer than the last it saw."""

    def __init__(self, actions: list[str], antavo_conn_id: str = "antavo_default", poll_interval: float = 5.0):
        super().__init__()
        self.actions, self.antavo_conn_id, self.poll_interval = sorted(actions), antavo_conn_id, poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("antavo_feed_watcher.AntavoFeedWatcher",
                {"actions": self.actions, "antavo_conn_id": self.antavo_conn_id, "poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from antavo_ometria.airflow.hooks import antavo_config
        from antavo_ometria.antavo.client import AntavoClient
        from antavo_ometria.antavo.records import event_time
        from antavo_ometria.sync.events.delivery import read_feed

        client = AntavoClient(antavo_config(await BaseHook.aget_connection(self.antavo_conn_id)))
        since = datetime.now(UTC)
        while True:
            try:
                feed = await asyncio.to_thread(read_feed, client, set(self.actions), since, datetime.now(UTC))
            except Exception as exc:  # the watcher keeps watching; nothing in the UI turns red
                log.warning("reading Antavo's event feed failed: %s", exc)
            else:
                found = [e for action in self.actions for e in feed.events(action, since) if e["timestamp"]]
                if found:
                    since = max(event_time(e) for e in found)
                    yield TriggerEvent({"found": len(found), "newest": since.isoformat()})
            await asyncio.sleep(self.poll_interval)
