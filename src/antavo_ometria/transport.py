"""HTTP plumbing shared by both API clients: a token-bucket rate limit and retries with backoff (tenacity)."""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests
import tenacity
import urllib3

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
GATEWAY_STATUS = frozenset({502, 504})  # a proxy's answer: the request may have been passed on before it failed


class ApiError(Exception):
    """An API call failed. `retryable` tells whether trying again could help."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After)


class AnswerLost(ApiError):
    """The request may have been read but its answer did not arrive (a read timeout, a connection closed before
    the answer, a gateway's 502 or 504): the server may have acted on it. Raised at once, not retried, when sending
    it again is not known to be harmless."""


class AuthenticationFailed(ApiError):
    """The API refused our credentials (HTTP 401 or 403): every further request would be refused too."""


AUTH_STATUS = frozenset({401, 403})


class RateLimiter:
    """Token bucket shared by all threads of one client: at most `rate` requests a second."""

    def __init__(self, rate: float, burst: int = 1):
        self.rate = rate
        self.capacity = max(1, burst)
        self._tokens = float(self.capacity)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.rate:
            return
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self.rate
            time.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Empty the bucket so that every thread waits `seconds` (the server asked us to slow down)."""
        with self._lock:
            self._tokens = min(self._tokens, 1 - seconds * self.rate)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff: float = 0.5  # seconds before the 2nd attempt, doubled each time
    max_backoff: float = 30.0

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the given (1-based) failed attempt."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def retry_after_seconds(response: requests.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), if any."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def request_with_retries(
    send: Callable[[], requests.Response],
    *,
    what: str,
    policy: RetryPolicy,
    limiter: RateLimiter,
    check: Callable[[requests.Response], None] = lambda r: None,
    resend_unanswered: bool = True,
) -> requests.Response:
    """Call `send` under the rate limit; retry 429, 5xx and network errors with backoff (tenacity).

    Without `resend_unanswered` (a request whose repeat is not known to be harmless), an answer lost after the
    request may have been read raises AnswerLost at once (see _network_error; a gateway's 502 or 504 too).

    A `Retry-After` header sets the wait, and a 429 slows every thread of the client down as long.
    `check` may raise ApiError for a response whose status looks fine (e.g. an error body in a 200).
    Permanent errors (other 4xx) raise at once; retryable ones raise after the last attempt.
    """

    def attempt() -> requests.Response:
        limiter.acquire()
        try:
            response = send()
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _network_error(what, exc, resend_unanswered) from None
        if response.status_code in GATEWAY_STATUS and not resend_unanswered:
            raise AnswerLost(f"{what}: HTTP {response.status_code} from a gateway, which may have passed the request "
                             "on: the server may have acted on it, so it was not sent again", status=response.status_code)
        if response.status_code in RETRYABLE_STATUS:
            raise ApiError(f"{what}: HTTP {response.status_code}", status=response.status_code, retryable=True,
                           retry_after=retry_after_seconds(response))
        if response.status_code in AUTH_STATUS:
            raise AuthenticationFailed(f"{what}: HTTP {response.status_code}: {_short_body(response)}",
                                       status=response.status_code)
        if response.status_code >= 400:
            raise ApiError(f"{what}: HTTP {response.status_code}: {_short_body(response)}", status=response.status_code)
        check(response)
        return response

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception()
        seconds = error.retry_after if error.retry_after is not None else policy.delay(state.attempt_number)
        if error.status == 429:
            limiter.pause(seconds)
        return seconds

    def warn(state: tenacity.RetryCallState) -> None:
        log.warning("%s (attempt %d/%d), retrying in %.1fs", state.outcome.exception(), state.attempt_number,
                    policy.attempts, state.next_action.sleep)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts), wait=wait, before_sleep=warn, reraise=True,
        retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, ApiError) and exc.retryable),
    )
    try:
        return retrying(attempt)
    except ApiError as exc:
        if not exc.retryable:
            raise
        raise ApiError(f"{exc} (gave up after {policy.attempts} attempts)", status=exc.status, retryable=True) from None


def _network_error(what: str, exc: requests.RequestException, resend_unanswered: bool) -> ApiError:
    """A retryable error for a request that failed on the network; AnswerLost when the request may have reached the
    server (anything but a connection never made) and must not be sent again."""
    if not resend_unanswered and not _never_sent(exc):
        return AnswerLost(f"{what}: {_network_problem(exc)} after the request may have been read: the server may have "
                          "acted on it, so it was not sent again")
    return ApiError(f"{what}: {_network_problem(exc)}", retryable=True)


def _never_sent(exc: requests.RequestException) -> bool:
    """The connection was never made (a connect timeout, a refused connection, an unknown host, a proxy that refused
    it, a certificate refused), so the server cannot have read the request. Any other TLS error may come while the
    answer is read."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    never = (urllib3.exceptions.NewConnectionError, ssl.SSLCertVerificationError)  # also an unknown host, a bad name
    return any(isinstance(cause, never) for cause in _causes(exc))


def _causes(exc: BaseException):
    """The exception and what it wraps (requests → urllib3's MaxRetryError → its reason → a proxy's original error)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        inner = getattr(exc, "reason", None) or getattr(exc, "original_error", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in exc.args if isinstance(a, BaseException)), None) or exc.__cause__ or exc.__context__
        exc = inner


def _network_problem(exc: requests.RequestException) -> str:
    """What went wrong on the network, naming the host (never the query, which may carry a signature)."""
    url = getattr(exc.request, "url", None) or ""
    host = urlsplit(url).netloc or "the server"
    if isinstance(exc, requests.Timeout):
        return f"{host} did not answer in time ({type(exc).__name__})"
    if any(isinstance(cause, urllib3.exceptions.ProtocolError) for cause in _causes(exc)):
        return f"the connection to {host} closed before an answer came (ConnectionError)"
    if isinstance(exc, requests.exceptions.SSLError):
        return (f"no TLS connection with {host} (SSLError: check http:// or https:// in the connection's host, "
                "and the server's certificate; verify_tls in the connection's extra turns the check off)")
    return f"cannot reach {host} ({type(exc).__name__}: is the host name right, and is it reachable from here?)"


def _short_body(response: requests.Response, limit: int = 300) -> str:
    text = response.text or ""
    return text if len(text) <= limit else text[:limit] + "…"
