"""Ometria, the destination: the push API client (`POST /v2/push`, `X-Ometria-Auth`).

Ometria's documented rules: a JSON array of at most 100 records per request, one record type per
request, at most 60 KB per record, an account-wide rate limit (4 requests/s by default), 429 when
over it or when the asynchronous queue is full, and later validation errors at `GET /v2/push/_errors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import requests

from antavo_ometria.transport import ApiError, RateLimiter, RetryPolicy, request_with_retries

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.ometria.com"
MAX_BATCH_RECORDS = 100
MAX_RECORD_BYTES = 60 * 1024
RECORD_TYPES = ("contact", "order", "product", "custom_event")
RATE_MARGIN = 0.98
QUEUE_LOW_WATER = 1000  # slow down when Ometria's queue has less room than this


@dataclass(frozen=True)
class OmetriaConfig:
    api_key: str
    base_url: str = DEFAULT_BASE_URL
    requests_per_second: float = 4.0
    timeout: float = 30.0
    verify_tls: bool = True
    retry: RetryPolicy = RetryPolicy()

    def __repr__(self) -> str:  # never show the key
        return f"OmetriaConfig(base_url={self.base_url!r})"


@dataclass
class PushResult:
    """What Ometria answered for one batch."""

    status: str
    request_id: str
    accepted: int
    rejected: int
    ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OversizedRecord:
    id: str
    size: int
    reason: str


def encode_record(record: dict) -> bytes:
    """Compact JSON; a non-finite number raises ValueError rather than becoming `NaN`, which is not JSON."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


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


class OmetriaClient:
    def __init__(self, config: OmetriaConfig):
        self.config = config
        self.base = config.base_url.rstrip("/")
        # a hair under the account's limit, so that timing jitter never makes the sync itself cause a 429
        self.limiter = RateLimiter(config.requests_per_second * RATE_MARGIN)
        self.session = requests.Session()
        self.session.verify = config.verify_tls
        self.session.headers.update(
            {
                "X-Ometria-Auth": config.api_key,
                "Content-Type": "application/json",
                "Accept": "application/json",
            }
        )

    def push_encoded(self, record_type: str, bodies: list[bytes]) -> PushResult:
        """Push one batch of already-encoded records, all of `record_type`."""
        if record_type not in RECORD_TYPES:
            raise ValueError(f"unknown Ometria record type {record_type!r}")
        if not 0 < len(bodies) <= MAX_BATCH_RECORDS:
            raise ValueError(f"a push holds 1..{MAX_BATCH_RECORDS} records, not {len(bodies)}")
        payload = b"[" + b",".join(bodies) + b"]"

        def send() -> requests.Response:
            return self.session.post(f"{self.base}/v2/push", data=payload, timeout=self.config.timeout)

        response = request_with_retries(
            send, what="POST /v2/push", policy=self.config.retry, limiter=self.limiter
        )
        self._respect_queue(response)
        body = response.json()
        return PushResult(
            status=str(body.get("status", "")),
            request_id=str(body.get("request_id", "")),
            accepted=int(body.get("accepted", 0)),
            rejected=int(body.get("rejected", 0)),
        )

    def push(self, records: list[dict]) -> PushResult:
        """Push one batch of records (dicts); they must all share one `@type`."""
        types = {r.get("@type") for r in records}
        if len(types) != 1:
            raise ValueError(f"a push must not mix record types, got {sorted(map(str, types))}")
        return self.push_encoded(types.pop(), [encode_record(r) for r in records])

    def _respect_queue(self, response: requests.Response) -> None:
        remaining = response.headers.get("X-QueueSize-Remaining")
        if remaining is not None and remaining.isdigit() and int(remaining) < QUEUE_LOW_WATER:
            log.warning("Ometria's import queue is nearly full (%s left); slowing down", remaining)
            self.limiter.pause(5.0)

    def push_errors(self) -> list[dict]:
        """The most recent asynchronous validation errors (`GET /v2/push/_errors`)."""
        return self._get("/v2/push/_errors")

    def lists(self, mode: str = "active") -> list[dict]:
        return self._get(f"/v2/lists?mode={mode}")

    def _get(self, path: str) -> list[dict]:
        response = request_with_retries(
            lambda: self.session.get(f"{self.base}{path}", timeout=self.config.timeout),
            what=f"GET {path.split('?')[0]}",
            policy=self.config.retry,
            limiter=self.limiter,
        )
        body = response.json()
        if not isinstance(body, list):
            raise ApiError(f"GET {path}: expected a JSON array")
        return body
