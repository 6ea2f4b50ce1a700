"""Pushing to Ometria: batches of at most 100 records, the 60 KB rule, and batches that isolate a refused record.

A push's outcome is a journal entry (a dict, as written to the load journal): the ids and payload hashes of
its records, and Ometria's answer (`status`, `request_id`, `accepted`, `rejected`) or the error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.contract import MAX_BATCH_RECORDS, MAX_RECORD_BYTES
from antavo_ometria.ometria.payload import payload_hash
from antavo_ometria.transport import ApiError, AuthenticationFailed

log = logging.getLogger(__name__)

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
            refused.append(
                OversizedRecord(
                    record_id,
                    len(body),
                    f"record is {len(body)} bytes; Ometria accepts at most {MAX_RECORD_BYTES}",
                )
            )
        else:
            fits.append((record_id, body))
    return fits, refused


def push_isolating(client: OmetriaClient, ids: list[str], bodies: list[bytes], hashes: list[str] | None = None,
                   record_type: str = "contact", isolate: bool = True) -> list[dict]:
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
        return [{"ids": ids, "hashes": hashes, "status": "FAILED", "error": str(exc),
                 "retryable": exc.retryable or exc.status == 400, "accepted": 0, "rejected": 0}]
    if isolate and 0 < result.rejected < len(ids):  # find the rejected records
        return (push_isolating(client, ids[:halves], bodies[:halves], hashes[:halves], record_type, isolate)
                + push_isolating(client, ids[halves:], bodies[halves:], hashes[halves:], record_type, isolate))
    return [{"ids": ids, "hashes": hashes, "status": result.status, "request_id": result.request_id,
             "accepted": result.accepted, "rejected": result.rejected}]


def record_status(entry: dict) -> str:
    """What a journal entry says of its records: sent, rejected (by Ometria), or failed (not delivered).

    A batch pushed without isolation in which only some records were rejected counts as sent: which ones
    Ometria refused is only in its asynchronous errors."""
    if entry["status"] != "OK":
        return "failed"
    return "rejected" if entry["rejected"] >= len(entry["ids"]) else "sent"
