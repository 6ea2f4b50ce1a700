"""Pushing to Ometria: batches of at most 100 records, the 60 KB rule, and batches that isolate a refused record.

A push's outcome is a `JournalEntry` (as written to the load journal): the ids and payload hashes of its records,
and Ometria's answer (`status`, `request_id`, `accepted`, `rejected`) or the error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum

from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.contract import MAX_BATCH_RECORDS, MAX_RECORD_BYTES
from antavo_ometria.ometria.payload import payload_hash
from antavo_ometria.transport import AnswerLost, ApiError, AuthenticationFailed

log = logging.getLogger(__name__)

ANSWERED = "OK"  # Ometria's status for a push it answered (each record accepted or rejected)
NOT_ANSWERED = "FAILED"  # the push got no usable answer: nothing is known to have arrived


class PushOutcome(StrEnum):
    """What a journal entry says of its records."""

    SENT = "sent"  # accepted by Ometria
    REJECTED = "rejected"  # refused by Ometria
    FAILED = "failed"  # not delivered


@dataclass(frozen=True)
class JournalEntry:
    """One push: its records (ids, payload hashes) and Ometria's answer, or the error that stopped it."""

    ids: list[str]
    hashes: list[str]
    status: str  # ANSWERED or NOT_ANSWERED
    accepted: int = 0
    rejected: int = 0
    request_id: str | None = None
    error: str | None = None
    retryable: bool = True  # for a push not answered: whether trying it again can help
    attempt: str | None = None  # the run's attempt that pushed it (see `Plan.attempt`)
    removal: bool = False  # a removal from the list, not a contact's data
    answer_lost: bool | None = None  # sent, but the answer did not arrive: Ometria may have stored its records

    @property
    def outcome(self) -> PushOutcome:
        """Sent, rejected (by Ometria), or failed (not delivered). A batch pushed without isolation in which only
        some records were rejected counts as sent: which ones Ometria refused is only in its asynchronous errors."""
        if self.status != ANSWERED:
            return PushOutcome.FAILED
        return PushOutcome.REJECTED if self.rejected >= len(self.ids) else PushOutcome.SENT

    def tagged(self, attempt: str, removal: bool = False) -> JournalEntry:
        return replace(self, attempt=attempt, removal=removal)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def of(cls, value: JournalEntry | dict) -> JournalEntry:
        """An entry from the journal as written (keys this release does not know are ignored)."""
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


@dataclass(frozen=True)
class OversizedRecord:
    id: str
    size: int
    reason: str


def batches(
    encoded: Iterable[tuple[str, bytes]], size: int = MAX_BATCH_RECORDS
) -> Iterator[tuple[list[str], list[bytes]]]:
    """Group (id, encoded record) pairs into batches of at most `size` records."""
    ids: list[str] = []
    bodies: list[bytes] = []
    for record_id, body in encoded:
        ids.append(record_id)
        bodies.append(body)
        if len(bodies) == size:
            yield ids, bodies
            ids, bodies = [], []
    if bodies:
        yield ids, bodies


def split_oversized(
    encoded: Iterable[tuple[str, bytes]],
) -> tuple[list[tuple[str, bytes]], list[OversizedRecord]]:
    """Ometria refuses records over 60 KB; hold them back locally with the reason."""
    fits, refused = [], []
    for record_id, body in encoded:
        if len(body) > MAX_RECORD_BYTES:
            refused.append(oversized(record_id, len(body)))
        else:
            fits.append((record_id, body))
    return fits, refused


def oversized(record_id: str, size: int) -> OversizedRecord:
    """A record of `size` bytes, over Ometria's 60 KB, held back with the reason."""
    return OversizedRecord(record_id, size, f"record is {size} bytes; Ometria accepts at most {MAX_RECORD_BYTES}")


def push_isolating(client: OmetriaClient, ids: list[str], bodies: list[bytes], hashes: list[str] | None = None,
                   record_type: str = "contact", isolate: bool = True) -> list[JournalEntry]:
    """Push one batch; journal entries (ids, hashes, Ometria's answer) for it and for any halves it was split into.

    With `isolate`, a batch in which Ometria rejected some records is halved until each rejected record stands
    alone (accepted records are pushed again on the way: an upsert for contacts). A request refused whole
    (HTTP 400 with no word on which record) is a failed batch, not a rejection of each record: a proxy or a
    bad minute answers 400 to every batch alike, and those records stay owed until a later push is accepted.
    """
    hashes = hashes or [payload_hash(body) for body in bodies]
    halves = len(ids) // 2
    try:
        result = client.push_encoded(record_type, bodies)
    except AuthenticationFailed:
        raise  # a refused API key is refused for every batch: stop at the first
    except ApiError as exc:
        log.error("batch of %d records not delivered: %s", len(ids), exc)
        return [JournalEntry(ids, hashes, NOT_ANSWERED, error=str(exc), retryable=exc.retryable or exc.status == 400
                             or isinstance(exc, AnswerLost), answer_lost=isinstance(exc, AnswerLost) or None)]
    if isolate and 0 < result.rejected < len(ids):  # find the rejected records
        return (push_isolating(client, ids[:halves], bodies[:halves], hashes[:halves], record_type, isolate)
                + push_isolating(client, ids[halves:], bodies[halves:], hashes[halves:], record_type, isolate))
    return [JournalEntry(ids, hashes, result.status, result.accepted, result.rejected, result.request_id)]


def record_status(entry: JournalEntry) -> PushOutcome:
    """What a journal entry says of its records (see `JournalEntry.outcome`)."""
    return entry.outcome
