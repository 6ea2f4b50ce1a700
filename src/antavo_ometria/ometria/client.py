"""Ometria, the destination: the push API client (`POST /v2/push`, `X-Ometria-Auth`).

It keeps to the documented limits in `contract.py` (100 records of one type per request, the account's
rate limit); a 429 (over the limit, or the asynchronous queue full) is retried after the time asked, and
validation errors found later are read from `GET /v2/push/_errors`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import requests

from antavo_ometria.ometria.contract import (
    DEFAULT_BASE_URL,
    DEFAULT_REQUESTS_PER_SECOND,
    ERRORS_PATH,
    LISTS_PATH,
    MAX_BATCH_RECORDS,
    PUSH_PATH,
    RECORD_TYPES,
    REPEAT_UNDOCUMENTED,
)
from antavo_ometria.transport import ApiError, RateLimiter, RetryPolicy, request_with_retries

log = logging.getLogger(__name__)

RATE_MARGIN = 0.98
QUEUE_LOW_WATER = 1000  # slow down when Ometria's queue has less room than this


@dataclass(frozen=True)
class OmetriaConfig:
    api_key: str
    base_url: str = DEFAULT_BASE_URL
    requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND
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


class OmetriaClient:
    def __init__(self, config: OmetriaConfig):
        self.config = config
        self.base = config.base_url.rstrip("/")
        # a hair under the account's limit, so that timing jitter never makes the sync itself cause a 429
        self.limiter = RateLimiter(config.requests_per_second * RATE_MARGIN)
        headers = {"X-Ometria-Auth": config.api_key, "Content-Type": "application/json", "Accept": "application/json"}
        self.session, self.one_off = requests.Session(), requests.Session()  # one_off: a new connection each request
        for session, extra in ((self.session, {}), (self.one_off, {"Connection": "close"})):
            session.verify = config.verify_tls
            session.headers.update({**headers, **extra})

    def push_encoded(self, record_type: str, bodies: list[bytes]) -> PushResult:
        """Push one batch of already-encoded records, all of `record_type`.

        A push of custom events whose answer is lost (a read timeout, a dropped connection, a gateway's 502 or 504)
        raises AnswerLost instead of being sent again:
        Ometria may have stored them, and whether a repeated id starts an automation again is not documented."""
        if record_type not in RECORD_TYPES:
            raise ValueError(f"unknown Ometria record type {record_type!r}")
        if not 0 < len(bodies) <= MAX_BATCH_RECORDS:
            raise ValueError(f"a push holds 1..{MAX_BATCH_RECORDS} records, not {len(bodies)}")
        payload = b"[" + b",".join(bodies) + b"]"
        # a custom event goes on a connection of its own: a dropped connection is then a lost answer, never a kept-alive
        # connection the server had closed
        session = self.one_off if record_type in REPEAT_UNDOCUMENTED else self.session

        def send() -> requests.Response:
            return session.post(f"{self.base}{PUSH_PATH}", data=payload, timeout=self.config.timeout)

        response = request_with_retries(
            send, what=f"POST {PUSH_PATH}", policy=self.config.retry, limiter=self.limiter,
            resend_unanswered=record_type not in REPEAT_UNDOCUMENTED,
        )
        self._respect_queue(response)
        body = response.json()
        return PushResult(
            status=str(body.get("status", "")),
            request_id=str(body.get("request_id", "")),
            accepted=int(body.get("accepted", 0)),
            rejected=int(body.get("rejected", 0)),
        )

    def _respect_queue(self, response: requests.Response) -> None:
        remaining = response.headers.get("X-QueueSize-Remaining")
        if remaining is not None and remaining.isdigit() and int(remaining) < QUEUE_LOW_WATER:
            log.warning("Ometria's import queue is nearly full (%s left); slowing down", remaining)
            self.limiter.pause(5.0)

    def push_errors(self) -> list[dict]:
        """The most recent asynchronous validation errors (`GET /v2/push/_errors`)."""
        return self._get(ERRORS_PATH)

    def lists(self, mode: str = "active") -> list[dict]:
        return self._get(f"{LISTS_PATH}?mode={mode}")

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
