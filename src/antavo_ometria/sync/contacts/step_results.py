"""The records a run's steps hand on: the plan and each step's result.

They cross task boundaries through XCom as plain dicts (`as_dict`); a step takes either (`of`), so that the
DAG, the CLI and the tests call the steps the same way. The run report is a JSON document (`report.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Self

from antavo_ometria.sync.tables.settings import SyncSettings, load_settings, mappings_dir


class RunStatus(StrEnum):
    """A contact run's status, as the state store keeps it and the report shows it."""

    RUNNING = "running"
    SUCCESS = "success"  # everything delivered, or visibly held back with a reason
    FAILED = "failed"
    DRY_RUN = "dry_run"  # nothing was sent


class Record:
    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, value: Self | dict) -> Self:
        if isinstance(value, cls):
            return value
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


@dataclass(frozen=True)
class Plan(Record):
    """What a run does: full or incremental, over which window, and why. Crosses tasks as a dict (XCom)."""

    dag_id: str
    run_id: str
    # a new attempt each time the run is planned (a Clear, a backfill that reprocesses the run): its load
    # sends what its own transform produced, whatever an earlier attempt's journal says
    attempt: str
    mode: str  # "full" or "incremental"
    full_resync_reason: str | None
    resumed: str | None  # why an incremental run starts before its data interval
    send_unchanged: bool  # unchanged contacts are skipped, except when everything must be re-sent
    dry_run: bool
    mapping_version: str
    since: str | None  # ISO 8601; incremental runs only
    until: str
    previous_full_count: int | None  # customers in the last full load, for the quality gate's batch check
    retry_ids: tuple[str, ...] = ()  # owed contacts (rejected or not delivered) due a retry: read again
    reconcile_reason: str | None = None  # why this full read is a reconciliation (only what differs is sent)
    # settings.toml as it was when the run was planned: the steps take the run's thresholds, cap, retries and list
    # from here, whatever an analyst saves meanwhile (empty: the defaults)
    settings: dict = field(default_factory=dict)

    @property
    def run_settings(self) -> SyncSettings:
        return SyncSettings.of(self.settings)

    @classmethod
    def of(cls, value: Self | dict) -> Self:
        if isinstance(value, dict) and "settings" not in value:  # planned by a release before plans carried them
            value = {**value, "settings": asdict(load_settings(mappings_dir() / "settings.toml"))}
        return super().of(value)


@dataclass(frozen=True)
class Extracted(Record):
    path: str  # the staged customers (NDJSON)
    customers: int
    mode: str
    duplicate_ids: int  # customers Antavo listed twice (kept once: the copy updated last)
    reads: str = ""  # how they were read: "scan" (Read API pages) or "profiles" (a request per changed customer)
    reads_reason: str = ""  # why: the requests each way would cost
    # the change list may have missed changes (see `antavo.client.ChangeList`): schedule a reconciliation
    suspect_missed: bool = False
    suspect_reason: str = ""


@dataclass(frozen=True)
class Transformed(Record):
    customers: int  # checked by the quality gate
    valid: int
    changed: int  # to send: their payload differs from what Ometria last received from us
    unchanged: int
    quarantined: int
    quarantine_reasons: dict[str, int]  # check → customers held back by it
    quality: dict  # the gate's summary: counts, warnings, empty share per field
    mapping_version: str
    payload_mode: str
    resent_unchanged: int = 0  # sent again although Ometria accepted the same payload (a re-sync, a backfill)
    owed_settled: int = 0  # owed contacts whose payload Ometria had accepted after all: no longer owed
    leavers: int = 0  # members who left the programme: to be removed from the list


@dataclass(frozen=True)
class Loaded(Record):
    batches: int
    sent: int
    accepted: int
    rejected: int
    failed: int
    refused_oversized: int
    async_errors: int = 0  # validation errors Ometria listed at /v2/push/_errors since the last poll
    removed_from_list: int = 0  # members who left the programme, removed from the list
    # of `sent`, accepted by an earlier try of this load (a retry, a Clear of only the load): not sent again
    delivered_earlier: int = 0
    deferred: int = 0  # over sync.max_contacts_per_run: not sent, owed, the next run sends them
    retried: int = 0  # contacts owed by earlier runs (rejected, not delivered, deferred) sent again
    retried_accepted: int = 0  # … of which Ometria accepted
    dry_run: bool = False
    would_send: int = 0  # dry runs: the contacts that would have been sent
