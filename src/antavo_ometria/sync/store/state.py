"""The sync's state store, through SQLAlchemy: a SQLite file by default, any SQLAlchemy URL otherwise.

It remembers every run (the counts a run report shows), the hash of the last payload sent for each
contact (so unchanged contacts are not sent again), records held back (quarantined, rejected,
failed) with reasons and payloads, custom events already pushed, and Ometria's asynchronous errors.
The schema is managed by Alembic migrations in `migrations/`, applied by `migrate()`.

`StateStore` is one part per concept, each owning its tables, on one connection: `runs` (sync_runs),
`contacts` (sync_contacts), `held` (sync_held_records), `push_errors` (sync_push_errors) and `events` (sync_events,
sync_event_leases, sync_event_cursors).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cache
from pathlib import Path

import sqlalchemy as sa

from antavo_ometria.sync.contacts.step_results import RunStatus

log = logging.getLogger(__name__)

VERSION_TABLE = "sync_alembic_version"  # not Alembic's default, so it can share a database with Airflow
MIGRATIONS = Path(__file__).with_name("migrations")
metadata = sa.MetaData()
_IN_CHUNK = 900  # below SQLite's bound-parameter limit




class ContactStatus(StrEnum):
    """A contact's status in `sync_contacts` (stored as its value)."""

    SENT = "sent"  # Ometria accepted its last push
    REJECTED = "rejected"  # owed: Ometria refused it
    FAILED = "failed"  # owed: not delivered
    DEFERRED = "deferred"  # owed: over the run's cap (sync.max_contacts_per_run), not tried yet
    LEFT = "left"  # left the programme
    HELD = "held"  # was owed, now held back by the quality gate: sent again once it changes in Antavo


class HeldKind(StrEnum):
    """Why a contact is in `sync_held_records` (events have kinds of their own)."""

    QUARANTINED = "quarantined"  # by the quality gate
    REJECTED = "rejected"  # by Ometria
    FAILED = "failed"  # not delivered


ACCEPTED, REJECTED, FAILED, LEFT = ContactStatus.SENT, ContactStatus.REJECTED, ContactStatus.FAILED, ContactStatus.LEFT
DEFERRED, HELD_BACK = ContactStatus.DEFERRED, ContactStatus.HELD
OWED = (REJECTED, FAILED, DEFERRED)
LAST_POLL = "(last poll)"  # the run id under which Ometria's error list as last polled is kept


@dataclass(frozen=True)
class Backoff:
    """When an owed record is tried again: by the next run after its first failure, then after `first_hours`,
    doubling each time up to `max_hours`."""

    first_hours: float = 1.0
    max_hours: float = 24.0

    def next_try(self, moment: datetime, attempts: int) -> datetime:
        if attempts <= 1:
            return moment
        return moment + timedelta(hours=min(self.first_hours * 2 ** (attempts - 2), self.max_hours))


@dataclass
class Latencies:
    """One rule's custom events sent in a window: seconds from each event to Ometria accepting it, and how many
    of them were late (over 4 hours old when sent)."""

    seconds: list[float] = field(default_factory=list)
    late: int = 0


class StateStoreUnavailable(Exception):
    """The state store cannot be reached; nothing has been sent."""


def now() -> datetime:
    return datetime.now(UTC)


def _chunks(items: list, size: int = _IN_CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


class Database:
    """The connection the store's parts share: the engine, the tables as the migrations made them, and upserts."""

    def __init__(self, url: str):
        self.engine = sa.create_engine(url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout = 30000"))
        self._tables: dict[str, sa.Table] = {}

    def table(self, name: str) -> sa.Table:
        if name not in self._tables:
            self._tables[name] = sa.Table(name, metadata, autoload_with=self.engine, extend_existing=True)
        return self._tables[name]

    def upsert(self, table: sa.Table, rows: list[dict], keys: list[str]) -> None:
        rows = list({tuple(r[k] for k in keys): r for r in rows}.values())  # one row per key: the last wins
        if not rows:
            return
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # other databases: delete then insert
            with self.engine.begin() as conn:
                for chunk in _chunks(rows):
                    conn.execute(table.delete().where(table.c[keys[0]].in_([r[keys[0]] for r in chunk])))
                    conn.execute(table.insert(), chunk)
            return
        statement = insert(table)  # one statement, executed for many rows (compiled once)
        statement = statement.on_conflict_do_update(
            index_elements=keys, set_={c: statement.excluded[c] for c in rows[0] if c not in keys})
        with self.engine.begin() as conn:
            for chunk in _chunks(rows, 10_000):
                conn.execute(statement, chunk)


class _Part:
    """A part of the store: it owns some tables, and reaches them through the shared `Database`."""

    def __init__(self, db: Database):
        self.db = db


class RunLog(_Part):
    """`sync_runs`: every run, its status and the counts its report shows; where syncing got to."""

    def start(self, dag_id: str, run_id: str, **fields) -> None:
        runs = self.db.table("sync_runs")
        row = {"dag_id": dag_id, "run_id": run_id, "status": str(RunStatus.RUNNING), "started_at": now(),
               "finished_at": None, **fields}
        with self.db.engine.begin() as conn:
            conn.execute(runs.delete().where((runs.c.dag_id == dag_id) & (runs.c.run_id == run_id)))
            conn.execute(runs.insert().values(**row))

    def finish(self, dag_id: str, run_id: str, status: RunStatus, report: dict | None = None, **counts) -> None:
        runs = self.db.table("sync_runs")
        values = {"status": str(status), "finished_at": now(), **counts}
        if report is not None:
            values["report"] = json.dumps(report, default=str, ensure_ascii=False)
        with self.db.engine.begin() as conn:
            conn.execute(runs.update().where((runs.c.dag_id == dag_id) & (runs.c.run_id == run_id)).values(**values))

    def recent(self, dag_id: str, limit: int = 20) -> list[dict]:
        runs = self.db.table("sync_runs")
        query = (sa.select(*[c for c in runs.c if c.name != "report"]).where(runs.c.dag_id == dag_id)
                 .order_by(runs.c.started_at.desc(), runs.c.id.desc()).limit(limit))
        with self.db.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def last_successful(self, dag_id: str, full_only: bool = False) -> dict | None:
        runs = self.db.table("sync_runs")
        query = sa.select(runs).where((runs.c.dag_id == dag_id) & (runs.c.status == str(RunStatus.SUCCESS))
                                      & (runs.c.dry_run == sa.false()))
        if full_only:
            query = query.where(runs.c.mode == "full")
        with self.db.engine.connect() as conn:
            row = conn.execute(query.order_by(runs.c.finished_at.desc(), runs.c.id.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def synced_until(self, dag_id: str) -> datetime | None:
        """Where syncing got to without a gap: the end of the last full load, moved forward by each successful
        run whose window starts at or before it. A run that covered a later window (a backfill of a later hour
        while an earlier one failed) does not move it past the gap."""
        runs = self.db.table("sync_runs")
        query = (sa.select(runs.c.mode, runs.c.interval_start, runs.c.interval_end)
                 .where((runs.c.dag_id == dag_id) & (runs.c.status == str(RunStatus.SUCCESS)) & (runs.c.dry_run == sa.false()))
                 .order_by(runs.c.finished_at, runs.c.id))
        with self.db.engine.connect() as conn:
            rows = conn.execute(query).all()
        mark: datetime | None = None
        for mode, start, end in rows:
            start, end = utc(start), utc(end)
            if end is None:
                continue
            if mode == "full":
                mark = end if mark is None else max(mark, end)
            elif mark is not None and (start is None or start <= mark):
                mark = max(mark, end)
        return mark

    def reconciliation_requested(self, dag_id: str) -> str | None:
        """Why a run since the last successful full read asked for a reconciliation (it suspected missed changes)."""
        runs = self.db.table("sync_runs")
        last_full = self.last_successful(dag_id, full_only=True)
        query = sa.select(runs.c.reconcile_requested).where(
            (runs.c.dag_id == dag_id) & runs.c.reconcile_requested.is_not(None))
        if last_full is not None:
            query = query.where(runs.c.started_at > last_full["started_at"])
        with self.db.engine.connect() as conn:
            return conn.execute(query.order_by(runs.c.started_at.desc()).limit(1)).scalar()

    def request_reconciliation(self, dag_id: str, run_id: str, reason: str) -> None:
        runs = self.db.table("sync_runs")
        with self.db.engine.begin() as conn:
            conn.execute(runs.update().where((runs.c.dag_id == dag_id) & (runs.c.run_id == run_id))
                         .values(reconcile_requested=reason[:500]))

    def pending_full_resync(self, dag_id: str) -> str | None:
        """The run id of a full re-sync that did not complete and that no full load has made good since."""
        return self._unfinished_full_run(dag_id, resync=True)

    def pending_reconciliation(self, dag_id: str) -> str | None:
        """The run id of a reconciliation that did not complete and that no full load has made good since."""
        return self._unfinished_full_run(dag_id, resync=False)

    def _unfinished_full_run(self, dag_id: str, resync: bool) -> str | None:
        """The newest failed full read of the kind asked (a re-sync: it has a reason; else a reconciliation)
        after the last successful full read. A failed reconciliation is not a re-sync: it does not re-send all."""
        runs = self.db.table("sync_runs")
        query = (sa.select(runs.c.run_id, runs.c.status, runs.c.full_resync_reason).where(
            (runs.c.dag_id == dag_id) & (runs.c.mode == "full") & (runs.c.dry_run == sa.false()))
            .order_by(runs.c.started_at.desc(), runs.c.id.desc()).limit(50))
        with self.db.engine.connect() as conn:
            for row in conn.execute(query):
                if row.status == RunStatus.SUCCESS:
                    return None
                if (row.full_resync_reason is not None) == resync:
                    return row.run_id
        return None


class ContactLedger(_Part):
    """`sync_contacts`: what Ometria accepted of each contact, and what is owed.

    A contact's row says what Ometria *accepted* (accepted_hash) apart from what was last pushed (payload_hash,
    status): a contact rejected, or not delivered, stays owed (status "rejected" or "failed") until a later
    push of it is accepted; `retry_at` spaces its tries out. A contact that left the programme is "left"."""

    def accepted_hashes(self, ids: list[str]) -> dict[str, str]:
        """id → hash of the payload Ometria last accepted (a rejected payload is not in it: it is owed)."""
        contacts = self.db.table("sync_contacts")
        found: dict[str, str] = {}
        with self.db.engine.connect() as conn:
            for chunk in _chunks(ids):
                rows = conn.execute(sa.select(contacts.c.antavo_id, contacts.c.accepted_hash)
                                    .where(contacts.c.antavo_id.in_(chunk) & contacts.c.accepted_hash.is_not(None)
                                           & (contacts.c.status != LEFT)))
                found.update(dict(rows.all()))
        return found

    def record_accepted(self, rows: Iterable[tuple[str, str]], mapping_version: str, run_id: str,
                        request_id: str | None = None, bodies: dict[str, bytes] | None = None) -> None:
        """Ometria accepted these (id, payload hash) pairs; with `bodies`, the payload is kept (compressed)."""
        moment = now()
        self.db.upsert(self.db.table("sync_contacts"), [
            {"antavo_id": i, "payload_hash": h, "accepted_hash": h, "status": ACCEPTED, "attempts": 0,
             "retry_at": None, "reason": None, "left_at": None, "mapping_version": mapping_version,
             "request_id": request_id, "run_id": run_id, "synced_at": moment,
             **({"payload": zlib.compress(bodies[i])} if bodies else {})} for i, h in rows
        ], ["antavo_id"])

    def record_owed(self, rows: Iterable[tuple[str, str]], status: str, reason: str, mapping_version: str,
                    run_id: str, backoff: Backoff, request_id: str | None = None) -> None:
        """These (id, payload hash) pairs were rejected, not delivered or deferred: still owed, tried again at
        `retry_at` (the next run after a first failure, then after growing waits; a deferred one is not a try,
        and is due at once). What Ometria accepted before is kept, except after a failed push: it may have been
        applied, so nothing counts as known until a push is accepted."""
        rows = list(rows)
        contacts = self.db.table("sync_contacts")
        before: dict[str, tuple] = {}
        with self.db.engine.connect() as conn:
            for chunk in _chunks([i for i, _ in rows]):
                query = sa.select(contacts.c.antavo_id, contacts.c.attempts, contacts.c.accepted_hash)
                before.update({r[0]: r[1:] for r in conn.execute(query.where(contacts.c.antavo_id.in_(chunk)))})
        moment = now()
        values = []
        tried = status != DEFERRED
        for i, h in rows:
            attempts, accepted = before.get(i, (0, None))
            if status == FAILED:  # an unanswered push may have been applied: what Ometria holds is unknown
                accepted = None
            attempts = (attempts or 0) + tried
            values.append({"antavo_id": i, "payload_hash": h, "accepted_hash": accepted, "status": status,
                           "attempts": attempts, "retry_at": backoff.next_try(moment, attempts) if tried else moment,
                           "reason": reason[:2000], "left_at": None, "mapping_version": mapping_version,
                           "request_id": request_id, "run_id": run_id, "synced_at": moment})
        self.db.upsert(contacts, values, ["antavo_id"])

    def record_left(self, ids: list[str], run_id: str, reason: str) -> None:
        """These members left the programme (and the list): no longer known to Ometria as members; if they come
        back, their contact is sent again."""
        contacts = self.db.table("sync_contacts")
        moment = now()
        with self.db.engine.begin() as conn:
            for chunk in _chunks(ids):
                conn.execute(contacts.update().where(contacts.c.antavo_id.in_(chunk)).values(
                    status=LEFT, accepted_hash=None, left_at=moment, retry_at=None, attempts=0, reason=reason[:2000],
                    run_id=run_id, synced_at=moment))

    def owed_ids(self, due_by: datetime | None = None, limit: int | None = None) -> list[str]:
        """Contacts owed to Ometria (rejected or not delivered), those due by `due_by` only when given; the
        longest owed first."""
        contacts = self.db.table("sync_contacts")
        query = sa.select(contacts.c.antavo_id).where(contacts.c.status.in_(OWED)).order_by(contacts.c.synced_at)
        if due_by is not None:
            query = query.where(contacts.c.retry_at.is_(None) | (contacts.c.retry_at <= due_by))
        with self.db.engine.connect() as conn:
            return list(conn.execute(query.limit(limit) if limit else query).scalars())

    def close_owed(self, ids: list[str], run_id: str, status: str, reason: str) -> None:
        """These owed contacts are owed no more (`status`: left, or held back); what Ometria accepted is kept."""
        contacts = self.db.table("sync_contacts")
        with self.db.engine.begin() as conn:
            for chunk in _chunks(ids):
                conn.execute(contacts.update().where(contacts.c.antavo_id.in_(chunk) & contacts.c.status.in_(OWED))
                             .values(status=status, retry_at=None, reason=reason[:2000], run_id=run_id))

    def owed_among(self, ids: list[str], not_of_run: str) -> set[str]:
        """Which of these contacts an earlier run left owed (this run's own first rejections are not among them;
        a retried contact that this run saw rejected again is: it has more than one try)."""
        contacts = self.db.table("sync_contacts")
        found: set[str] = set()
        with self.db.engine.connect() as conn:
            for chunk in _chunks(ids):
                found.update(conn.execute(sa.select(contacts.c.antavo_id).where(
                    contacts.c.antavo_id.in_(chunk) & contacts.c.status.in_(OWED)
                    & ((contacts.c.run_id != not_of_run) | (contacts.c.attempts > 1)))).scalars())
        return found

    def accepted_among(self, ids: list[str]) -> set[str]:
        """Which of these contacts Ometria accepted on their last push (not owed, held or left)."""
        return self._among(ids, ContactStatus.SENT)

    def left_among(self, ids: list[str]) -> set[str]:
        """Which of these contacts left the programme (removed from the list; pushing one would add it back)."""
        return self._among(ids, ContactStatus.LEFT)

    def _among(self, ids: list[str], status: ContactStatus) -> set[str]:
        contacts = self.db.table("sync_contacts")
        found: set[str] = set()
        with self.db.engine.connect() as conn:
            for chunk in _chunks(ids):
                found.update(conn.execute(sa.select(contacts.c.antavo_id).where(
                    contacts.c.antavo_id.in_(chunk) & (contacts.c.status == status))).scalars())
        return found

    def owed_count(self) -> int:
        contacts = self.db.table("sync_contacts")
        with self.db.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).where(contacts.c.status.in_(OWED))).scalar_one()

    def member_ids(self) -> set[str]:
        """Contacts Ometria accepted and that have not left: the members a full read should find again."""
        contacts = self.db.table("sync_contacts")
        query = sa.select(contacts.c.antavo_id).where(contacts.c.accepted_hash.is_not(None)
                                                      & (contacts.c.status != LEFT))
        with self.db.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def get(self, antavo_id: str) -> dict | None:
        """What was last sent for one contact: status, when, by which run and mapping, and the payload."""
        contacts = self.db.table("sync_contacts")
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(contacts).where(contacts.c.antavo_id == antavo_id)).first()
        if row is None:
            return None
        found = dict(row._mapping)
        found["payload"] = json.loads(zlib.decompress(found["payload"])) if found.get("payload") else None
        for name in ("synced_at", "retry_at", "left_at"):
            found[name] = utc(found.get(name))
        return found

    def known_count(self) -> int:
        """Contacts known to Ometria: accepted at least once, and not left since."""
        contacts = self.db.table("sync_contacts")
        with self.db.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).where(
                contacts.c.accepted_hash.is_not(None) & (contacts.c.status != LEFT))).scalar_one()


class HeldRecords(_Part):
    """`sync_held_records`: records held back (quarantined, rejected, not delivered; events too) with reasons."""

    def record(self, run_id: str, kind: str, rows: Iterable[dict]) -> None:
        """Add held-back records: {"id", "reasons": [...], "payload": dict | None}."""
        held = self.db.table("sync_held_records")
        moment = now()
        values = [{"run_id": run_id, "antavo_id": r.get("id"), "kind": kind, "customer_id": r.get("customer_id"),
                   "reasons": json.dumps(r["reasons"], ensure_ascii=False, default=str),
                   "payload": json.dumps(r["payload"], ensure_ascii=False, default=str) if r.get("payload") else None,
                   "created_at": moment} for r in rows]
        with self.db.engine.begin() as conn:
            for chunk in _chunks(values, 500):
                conn.execute(held.insert(), chunk)

    def clear(self, run_id: str, kind: str, keep: Collection[str] = ()) -> None:
        """Forget what a run held back of one kind (before a retry of that step records it again), but `keep`."""
        held = self.db.table("sync_held_records")
        with self.db.engine.begin() as conn:
            conn.execute(held.delete().where((held.c.run_id == run_id) & (held.c.kind == kind)
                                             & held.c.antavo_id.not_in(list(keep))))

    def release(self, ids: list[str], kinds: tuple[str, ...]) -> None:
        """These records are no longer held back (they were delivered, or are held again by a new row): kept as
        history, no longer shown as held."""
        held = self.db.table("sync_held_records")
        moment = now()
        with self.db.engine.begin() as conn:
            for chunk in _chunks(ids):
                conn.execute(held.update().where(held.c.antavo_id.in_(chunk) & held.c.kind.in_(kinds)
                                                 & held.c.released_at.is_(None)).values(released_at=moment))

    def events_owed(self, kind: str, rule: str, retry_after: timedelta) -> list[dict]:
        """The events of one rule held back now (of this kind) whose customer's contact Ometria has accepted: since
        the event was held, or at least `retry_after` ago (reads `sync_contacts` beside): {"id", "customer_id",
        "reasons", "payload"}."""
        held, contacts = self.db.table("sync_held_records"), self.db.table("sync_contacts")
        query = (sa.select(held.c.antavo_id, held.c.customer_id, held.c.reasons, held.c.payload)
                 .join(contacts, contacts.c.antavo_id == held.c.customer_id)
                 .where((held.c.kind == kind) & held.c.released_at.is_(None) & held.c.payload.is_not(None)
                        & held.c.run_id.like("%:" + rule.replace("_", "\\_"), escape="\\")
                        & (contacts.c.status == ContactStatus.SENT)
                        & ((contacts.c.synced_at > held.c.created_at) | (held.c.created_at < now() - retry_after))))
        with self.db.engine.connect() as conn:
            return [{"id": row.antavo_id, "customer_id": row.customer_id, "reasons": json.loads(row.reasons),
                     "payload": json.loads(row.payload)} for row in conn.execute(query)]

    def ids(self, kind: str) -> set[str]:
        """The ids held back now for this kind of reason."""
        held = self.db.table("sync_held_records")
        query = sa.select(held.c.antavo_id).where((held.c.kind == kind) & held.c.released_at.is_(None)).distinct()
        with self.db.engine.connect() as conn:
            return {i for i in conn.execute(query).scalars() if i is not None}

    def prune_released(self, older_than: datetime) -> int:
        """Forget held records released before `older_than` (the history a trace shows is kept that long)."""
        held = self.db.table("sync_held_records")
        with self.db.engine.begin() as conn:
            return conn.execute(held.delete().where(held.c.released_at < older_than)).rowcount

    def find(self, run_id: str | None = None, kind: str | tuple[str, ...] | None = None, limit: int = 100,
                     antavo_id: str | None = None, history: bool = False) -> list[dict]:
        """Records held back now (newest first); with `history`, also those released since. `antavo_id` also
        finds the events held back for that customer."""
        held = self.db.table("sync_held_records")
        query = sa.select(held).order_by(held.c.id.desc()).limit(limit)
        if not history:
            query = query.where(held.c.released_at.is_(None))
        if run_id:
            query = query.where(held.c.run_id == run_id)
        if kind:
            query = query.where(held.c.kind.in_([kind] if isinstance(kind, str) else kind))
        if antavo_id is not None:
            query = query.where((held.c.antavo_id == antavo_id) | (held.c.customer_id == antavo_id))
        with self.db.engine.connect() as conn:
            return [{**row._mapping, "reasons": json.loads(row.reasons), "created_at": utc(row.created_at),
                     "released_at": utc(row.released_at)} for row in conn.execute(query)]


class PushErrorLog(_Part):
    """`sync_push_errors`: Ometria's asynchronous validation errors, per run and as last polled."""

    def record(self, run_id: str, errors: list[dict]) -> None:
        table = self.db.table("sync_push_errors")
        moment = now()
        with self.db.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.run_id == run_id))
            if errors:
                conn.execute(table.insert(), [{"run_id": run_id, "error_path": str(e.get("error_path"))[:500],
                                               "error_message": str(e.get("error_message"))[:1000],
                                               "fetched_at": moment} for e in errors])

    def remember(self, errors: list[dict]) -> None:
        """Ometria's whole error list as last polled, so that the next poll tells what is new."""
        self.record(LAST_POLL, errors)

    def last_polled(self) -> list[dict]:
        table = self.db.table("sync_push_errors")
        query = sa.select(table.c.error_path, table.c.error_message).where(table.c.run_id == LAST_POLL)
        with self.db.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query.order_by(table.c.id))]


class EventLedger(_Part):
    """`sync_events`, `sync_event_leases`, `sync_event_cursors`: custom events pushed, who delivers a rule now, and
    how far each rule got."""

    def pushed_ids(self, ids: list[str]) -> set[str]:
        events = self.db.table("sync_events")
        found: set[str] = set()
        with self.db.engine.connect() as conn:
            for chunk in _chunks(ids):
                found.update(conn.execute(sa.select(events.c.event_id).where(events.c.event_id.in_(chunk))).scalars())
        return found

    def record(self, rows: list[dict]) -> None:
        self.db.upsert(self.db.table("sync_events"), [{**r, "pushed_at": now()} for r in rows], ["event_id"])

    def of_customer(self, customer_id: str) -> list[dict]:
        events = self.db.table("sync_events")
        query = sa.select(events).where(events.c.customer_id == customer_id).order_by(events.c.event_time)
        with self.db.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def sent_per_timestamp(self, event_type: str, spans: list[tuple[datetime, datetime]]) -> dict[datetime, int]:
        """Timestamp (whole second, UTC) → custom events of `event_type` already sent with it, within these spans
        (start and end included): where a burst split across deliveries continues its staggering."""
        events = self.db.table("sync_events")
        found: dict[datetime, int] = {}
        with self.db.engine.connect() as conn:
            for chunk in _chunks(spans, 100):
                within = sa.or_(*((events.c.sent_at >= start) & (events.c.sent_at <= end) for start, end in chunk))
                query = (sa.select(events.c.sent_at, sa.func.count()).group_by(events.c.sent_at)
                         .where((events.c.event_type == event_type) & (events.c.status == "sent") & within))
                for stamp, n in conn.execute(query):
                    second = utc(stamp).replace(microsecond=0)
                    found[second] = found.get(second, 0) + n
        return found

    def summary(self) -> dict[tuple[str, str], tuple[dict[str, int], int]]:
        """(rule, event type) → (events per status, events delivered late)."""
        events = self.db.table("sync_events")
        query = (sa.select(events.c.rule, events.c.event_type, events.c.status, events.c.late, sa.func.count())
                 .group_by(events.c.rule, events.c.event_type, events.c.status, events.c.late))
        summary: dict[tuple[str, str], tuple[dict[str, int], int]] = {}
        with self.db.engine.connect() as conn:
            for rule, event_type, status, late, count in conn.execute(query):
                counts, late_sent = summary.setdefault((rule, event_type), ({}, 0))
                counts[status] = counts.get(status, 0) + count
                if late and status == "sent":
                    summary[(rule, event_type)] = (counts, late_sent + count)
        return summary

    def take_lease(self, rule: str, holder: str, ttl: timedelta) -> bool:
        """Take the rule's delivery lease for `ttl`; False while another holder's has not expired."""
        leases = self.db.table("sync_event_leases")
        moment = now()
        with self.db.engine.begin() as conn:
            free = (leases.c.rule == rule) & ((leases.c.holder == holder) | (leases.c.expires_at < moment))
            if conn.execute(leases.update().where(free).values(holder=holder, expires_at=moment + ttl)).rowcount:
                return True
        try:  # no lease yet: of two deliveries inserting at once, one wins
            with self.db.engine.begin() as conn:
                conn.execute(leases.insert().values(rule=rule, holder=holder, expires_at=moment + ttl))
            return True
        except sa.exc.IntegrityError:
            return False

    def renew_lease(self, rule: str, holder: str, ttl: timedelta) -> bool:
        """Extend the lease `holder` holds for `ttl`; False when it no longer holds it (another delivery took it
        after it expired, and may have released it since): never takes a lease anew, since a delivery that lost
        it may have read as not pushed what the other one has pushed meanwhile."""
        leases = self.db.table("sync_event_leases")
        with self.db.engine.begin() as conn:
            mine = (leases.c.rule == rule) & (leases.c.holder == holder)
            return bool(conn.execute(leases.update().where(mine).values(expires_at=now() + ttl)).rowcount)

    def release_lease(self, rule: str, holder: str) -> None:
        leases = self.db.table("sync_event_leases")
        with self.db.engine.begin() as conn:
            conn.execute(leases.delete().where((leases.c.rule == rule) & (leases.c.holder == holder)))

    def lease_holder(self, rule: str) -> str | None:
        leases = self.db.table("sync_event_leases")
        with self.db.engine.connect() as conn:
            return conn.execute(sa.select(leases.c.holder).where(leases.c.rule == rule)).scalar()

    def latencies(self, since: datetime) -> dict[str, Latencies]:
        """Rule → seconds from each event to Ometria accepting it, for every event sent since `since`: late ones
        (over 4 hours old when sent: an outage, a back-off, a catch-up) too, counted apart as well."""
        events = self.db.table("sync_events")
        query = sa.select(events.c.rule, events.c.event_time, events.c.pushed_at, events.c.late).where(
            (events.c.status == "sent") & (events.c.pushed_at >= since))
        found: dict[str, Latencies] = {}
        with self.db.engine.connect() as conn:
            for rule, moment, pushed, late in conn.execute(query):
                rule_found = found.setdefault(rule, Latencies())
                rule_found.seconds.append((utc(pushed) - utc(moment)).total_seconds())
                rule_found.late += bool(late)
        return found

    def cursor(self, rule: str) -> datetime | None:
        cursors = self.db.table("sync_event_cursors")
        with self.db.engine.connect() as conn:
            return utc(conn.execute(sa.select(cursors.c.processed_until).where(cursors.c.rule == rule)).scalar())

    def set_cursor(self, rule: str, processed_until: datetime) -> None:
        self.db.upsert(self.db.table("sync_event_cursors"),
                       [{"rule": rule, "processed_until": processed_until, "updated_at": now()}], ["rule"])



class StateStore:
    """The sync's state, one part per concept, each owning its tables, all on one connection (`db`)."""

    def __init__(self, url: str):
        self.url = url
        self.db = Database(url)
        self.engine = self.db.engine
        self.runs = RunLog(self.db)
        self.contacts = ContactLedger(self.db)
        self.held = HeldRecords(self.db)
        self.push_errors = PushErrorLog(self.db)
        self.events = EventLedger(self.db)

    def __repr__(self) -> str:  # never show a password in the URL
        return f"StateStore({self.engine.url.render_as_string(hide_password=True)!r})"

    # -- schema ------------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the schema up to date; safe to call from parallel runs."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql":  # parallel runs must not race to create tables
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except sa.exc.OperationalError as exc:
            raise StateStoreUnavailable(f"state store {self!r} is unavailable: {exc.orig}") from None

    def ensure_schema(self) -> None:
        """Migrate only when the schema is behind: one small query on every other call (hooks, dashboard pages)."""
        try:
            with self.engine.connect() as conn:
                current = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        except sa.exc.OperationalError as exc:
            if "no such table" not in str(exc) and "does not exist" not in str(exc):
                raise StateStoreUnavailable(f"state store {self!r} is unavailable: {exc.orig}") from None
            current = None
        except sa.exc.ProgrammingError:  # PostgreSQL: the version table does not exist yet
            current = None
        if current != _head_revision():
            self.migrate()

    def table(self, name: str) -> sa.Table:
        return self.db.table(name)

    # -- the calls of the event delivery and the transform step, on the store as a whole -------------------
    def accepted_hashes(self, ids: list[str]) -> dict[str, str]:
        return self.contacts.accepted_hashes(ids)

    def record_accepted(self, rows: Iterable[tuple[str, str]], mapping_version: str, run_id: str,
                        request_id: str | None = None, bodies: dict[str, bytes] | None = None) -> None:
        self.contacts.record_accepted(rows, mapping_version, run_id, request_id, bodies)

    def owed_ids(self, due_by: datetime | None = None, limit: int | None = None) -> list[str]:
        return self.contacts.owed_ids(due_by, limit)

    def close_owed(self, ids: list[str], run_id: str, status: str, reason: str) -> None:
        self.contacts.close_owed(ids, run_id, status, reason)

    def member_ids(self) -> set[str]:
        return self.contacts.member_ids()

    def contact_count(self) -> int:
        return self.contacts.known_count()

    def record_held(self, run_id: str, kind: str, rows: Iterable[dict]) -> None:
        self.held.record(run_id, kind, rows)

    def clear_held(self, run_id: str, kind: str, keep: Collection[str] = ()) -> None:
        self.held.clear(run_id, kind, keep)

    def release_held(self, ids: list[str], kinds: tuple[str, ...]) -> None:
        self.held.release(ids, kinds)

    def held_ids(self, kind: str) -> set[str]:
        return self.held.ids(kind)

    def held_records(self, run_id: str | None = None, kind: str | tuple[str, ...] | None = None, limit: int = 100,
                     antavo_id: str | None = None, history: bool = False) -> list[dict]:
        return self.held.find(run_id, kind, limit, antavo_id, history)

    def pushed_event_ids(self, ids: list[str]) -> set[str]:
        return self.events.pushed_ids(ids)

    def record_events(self, rows: list[dict]) -> None:
        self.events.record(rows)

    def events_of(self, customer_id: str) -> list[dict]:
        return self.events.of_customer(customer_id)

    def take_lease(self, rule: str, holder: str, ttl: timedelta) -> bool:
        return self.events.take_lease(rule, holder, ttl)

    def renew_lease(self, rule: str, holder: str, ttl: timedelta) -> bool:
        return self.events.renew_lease(rule, holder, ttl)

    def release_lease(self, rule: str, holder: str) -> None:
        self.events.release_lease(rule, holder)

    def lease_holder(self, rule: str) -> str | None:
        return self.events.lease_holder(rule)

    def event_cursor(self, rule: str) -> datetime | None:
        return self.events.cursor(rule)

    def set_event_cursor(self, rule: str, processed_until: datetime) -> None:
        self.events.set_cursor(rule, processed_until)


@cache
def _head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def utc(value: datetime | None) -> datetime | None:
    """A time from the database in UTC (SQLite gives it without a zone, PostgreSQL in the session's)."""
    return value if value is None else value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def default_url() -> str:
    import os

    home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return os.environ.get("ANTAVO_OMETRIA_STATE_URL") or f"sqlite:///{Path(home) / 'antavo_ometria_state.db'}"
