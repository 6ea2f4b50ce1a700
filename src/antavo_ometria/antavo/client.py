"""Antavo, the source: a signed, rate-limited, read-only client (the record shapes are in `records.py`).

Endpoints and signing follow Antavo's public API documentation: Escher (AWS SigV4-style) signing with
algorithm ANTAVO-HMAC-SHA256 and scope `<environment>/api/antavo_request`; full loads through the
Loyalty Read API (`GET /v1/customers`), increments through the classic Customer API
(`GET /customers?updated_at.gt=...`, then `GET /customers/{id}`), events through `GET /customers/-/events`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import requests
from escherauth import EscherRequestsAuth

from antavo_ometria.antavo.records import HELD, NOT_FOUND, normalise_customer, normalise_event
from antavo_ometria.transport import ApiError, RateLimiter, RetryPolicy, request_with_retries

log = logging.getLogger(__name__)

ESCHER_OPTIONS = {
    "algo_prefix": "ANTAVO",
    "vendor_key": "Antavo",
    "hash_algo": "SHA256",
    "auth_header_name": "Authorization",
    "date_header_name": "Date",
}
READ_API_PAGE_LIMIT = 1000  # the Loyalty Read API's maximum page size
CLASSIC_PAGE_LIMIT = 100
# each page after the first starts this many records back: a record that leaves (or joins) the list while it
# is read shifts the offsets, and the overlap keeps the record at the shifted boundary from being skipped
PAGE_OVERLAP = 20
# a change list that moved past the overlap while it was paged is read again from its start this many times,
# then the step fails (retryable): a page boundary may have skipped customers, and they would never be read again
SHIFT_REREADS = 2
# loyalty fields a classic profile carries only when asked for with `fields=` (path prefix → extra)
PROFILE_EXTRAS = {"extensions.expiring_points": "expiring_points"}


def credential_scope(environment: str) -> str:
    return f"{environment}/api/antavo_request"


def api_url(environment: str) -> str:
    return f"https://api.{environment}.antavo.com"


def read_api_url(environment: str) -> str:
    return f"https://read-api.{environment}.antavo.com"


@dataclass(frozen=True)
class AntavoConfig:
    base_url: str
    api_key: str
    api_secret: str
    environment: str
    read_api_url: str = ""
    requests_per_second: float = 20.0
    concurrency: int = 8  # requests in flight at once (profile reads, pages read ahead), under the rate limit
    timeout: float = 30.0
    verify_tls: bool = True
    retry: RetryPolicy = RetryPolicy()

    def __repr__(self) -> str:  # never show the secret
        return f"AntavoConfig(base_url={self.base_url!r}, environment={self.environment!r})"


class ListShifted(ApiError):
    """A paged list moved by more than the page overlap while it was read: records may have been skipped."""

    def __init__(self, message: str):
        super().__init__(message, retryable=True)


@dataclass(frozen=True)
class ChangeList:
    """The customers the classic search lists as changed in a window, and whether to suspect it missed some.

    `suspect_missed` is set when the list moved past the page overlap while it was paged (customers changed in
    bulk during the read) and was only read whole on a re-read: what the search lists was then read completely,
    but a bulk change in Antavo is the likeliest to change customers without bumping `updated_at`, which no
    change list shows. A run that gets it should schedule a reconciliation (`reason` says why)."""

    ids: list[str]
    rereads: int = 0  # reads from the start again, after a shift
    suspect_missed: bool = False
    reason: str = ""


def moved_past_overlap(tail: Collection[str], ids: list[str]) -> bool:
    """True when a page shares no id with the overlap that the page before it ended on (`tail`): the list moved
    by more than the overlap while it was read, so a page boundary may have skipped records. (A shared id shows
    that nothing between the two pages was skipped, as long as the order is stable.)"""
    return bool(tail) and bool(ids) and not set(tail).intersection(ids[:PAGE_OVERLAP])


def overlap_tail(ids: list[str]) -> set[str]:
    """The ids a page ends on that the next page is read to overlap (none when the page is no longer)."""
    return set(ids[-PAGE_OVERLAP:]) if len(ids) > PAGE_OVERLAP else set()


class AntavoClient:
    def __init__(self, config: AntavoConfig):
        self.config = config
        self.read_api = (config.read_api_url or read_api_url(config.environment)).rstrip("/")
        self.base = config.base_url.rstrip("/")
        self.limiter = RateLimiter(config.requests_per_second, burst=min(config.concurrency, 4))
        self.session = requests.Session()
        self.session.verify = config.verify_tls
        self.session.auth = EscherRequestsAuth(
            config.api_key, config.api_secret, credential_scope(config.environment), ESCHER_OPTIONS
        )
        self.requests_made = 0

    def get(self, url: str, what: str, check=None) -> Any:
        parsed: list = []

        def send() -> requests.Response:
            self.requests_made += 1
            return self.session.get(url, timeout=self.config.timeout)

        def checks(response: requests.Response) -> None:
            parsed[:] = [_check_body(response)]
            if check is not None:
                check(parsed[0])

        request_with_retries(send, what=what, policy=self.config.retry, limiter=self.limiter, check=checks)
        return parsed[0]

    def ping(self) -> None:
        """One signed request to each API the sync reads (Read API and Customer API); raises ApiError if refused."""
        self.get(f"{self.read_api}/v1/customers?limit=1", "GET /v1/customers (connection check)",
                 check=_check_customer_page)
        self.get(f"{self.base}/customers?updated_at.gt={quote(_iso(datetime.now(UTC)))}&limit=1",
                 "GET /customers (connection check)")

    # -- customers -----------------------------------------------------------------------------
    def iter_customer_pages(self, status: str = "active", only: Collection[str] | None = None
                            ) -> Iterator[list[dict]]:
        """Every customer (or those of them whose id is in `only`), a page at a time, oldest first (Loyalty
        Read API), until `next` is null. A customer already read on the page before is not repeated."""
        query = f"limit={READ_API_PAGE_LIMIT}&{_oldest_first(status)}"

        def page(offset: int) -> dict:
            return self.get(f"{self.read_api}/v1/customers?{query}&offset={offset}",
                            f"GET /v1/customers offset={offset}", check=_check_customer_page)

        previous: set = set()
        tail: set = set()  # every id the page before ended on, kept or not
        for body in self._overlapping_pages(page, READ_API_PAGE_LIMIT, lambda body: len(body["payload"]["customers"]),
                                            _next_page):
            listed = body["payload"]["customers"]
            tail = _customer_page_tail(tail, listed)
            customers = [normalise_customer(c) for c in _only(listed, only)]
            chunk = [c for c in customers if c["id"] is None or c["id"] not in previous]
            if chunk:
                yield chunk
            previous = {c["id"] for c in customers}

    def read_sample(self, count: int, status: str = "active") -> list[dict]:
        """Up to `count` customers (at most a page of 1,000), oldest first, in one signed Read API request:
        real customers for a preview, without paging through the programme."""
        limit = max(1, min(count, READ_API_PAGE_LIMIT))
        query = f"limit={limit}&offset=0&{_oldest_first(status)}"
        body = self.get(f"{self.read_api}/v1/customers?{query}", "GET /v1/customers (sample)", check=_check_customer_page)
        return [normalise_customer(c) for c in body["payload"]["customers"][:limit] if isinstance(c, dict)]

    def changed_customer_ids(self, since: datetime, until: datetime | None = None) -> list[str]:
        """IDs of customers updated after `since` (classic search, `updated_at.gt`); see `read_change_list`."""
        return self.read_change_list(since, until).ids

    def read_change_list(self, since: datetime, until: datetime | None = None) -> ChangeList:
        """The customers updated after `since` (and before `until`), by the classic search, paged with overlap.

        A list that moves past the overlap while it is paged (customers changed during the read leave the window,
        and a page boundary skips the ones behind them) is read again from the start, up to SHIFT_REREADS times;
        then ListShifted (retryable) fails the step: never a silently short list."""
        for attempt in range(SHIFT_REREADS + 1):
            try:
                ids = self._search_changed(since, until)
            except ListShifted as exc:
                log.warning("%s (read %d of %d)", exc, attempt + 1, SHIFT_REREADS + 1)
                continue
            if not attempt:
                return ChangeList(ids)
            reason = (f"the change list moved by more than {PAGE_OVERLAP} customers while it was paged and was read "
                      f"again {attempt} time(s): customers were changing in bulk, and a bulk change may not bump "
                      "updated_at (which no change list shows); a reconciliation finds such changes")
            log.warning("suspect missed changes: %s", reason)
            return ChangeList(ids, attempt, suspect_missed=True, reason=reason)
        raise ListShifted(f"GET /customers?updated_at.gt: the change list kept moving by more than {PAGE_OVERLAP} "
                          f"customers while it was paged ({SHIFT_REREADS + 1} reads); the step is retried")

    def _search_changed(self, since: datetime, until: datetime | None) -> list[str]:
        """One read of the change list; ListShifted when it moved past the overlap between two pages."""
        stamp = quote(_iso(since))
        bound = f"&updated_at.lt={quote(_iso(until, up=True))}" if until is not None else ""

        def page(offset: int) -> list:
            body = self.get(f"{self.base}/customers?updated_at.gt={stamp}&limit={CLASSIC_PAGE_LIMIT}&offset={offset}"
                            + bound, f"GET /customers?updated_at.gt offset={offset}")
            rows = body.get("data") if isinstance(body, dict) else body
            if not isinstance(rows, list):
                raise ApiError("GET /customers: response has no data list", retryable=True)
            return rows

        ids: list[str] = []
        tail: set[str] = set()
        for rows in self._overlapping_pages(page, CLASSIC_PAGE_LIMIT, len, lambda rows: len(rows) >= CLASSIC_PAGE_LIMIT):
            listed = [str(row["id"]) for row in rows if isinstance(row, dict) and row.get("id")]
            if moved_past_overlap(tail, listed):
                raise ListShifted(f"GET /customers?updated_at.gt: the list moved by more than {PAGE_OVERLAP} "
                                  "customers between two pages (customers changed while it was read)")
            tail = overlap_tail(listed)
            ids += listed
        return list(dict.fromkeys(ids))

    def _overlapping_pages(self, fetch: Callable[[int], Any], limit: int, size: Callable[[Any], int],
                           more: Callable[[Any], Any]) -> Iterator[Any]:
        """The pages `fetch(offset)` returns, in order, until one says there are no `more`.

        Each page after the first starts PAGE_OVERLAP records back. Once a full page announced more, up to
        `concurrency` pages are requested ahead, at the offsets that full pages lead to (at the end, up to
        `concurrency - 1` requests find nothing); a page that came back short while more are announced is read
        again from its real offset."""
        step = limit - PAGE_OVERLAP
        offset, width = 0, 1
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            ahead: dict[int, Any] = {}
            try:
                while True:
                    window = [offset + k * step for k in range(width)]
                    for guess in [o for o in ahead if o not in window]:  # guessed before a page came back short
                        ahead.pop(guess).cancel()
                    for o in window:
                        ahead[o] = ahead.get(o) or pool.submit(fetch, o)
                    body = ahead.pop(offset).result()
                    yield body
                    if not more(body):
                        return
                    count = size(body)
                    width = self.config.concurrency if count == limit else 1
                    offset += count - PAGE_OVERLAP if count > PAGE_OVERLAP else count
            finally:
                for future in ahead.values():
                    future.cancel()

    def ids_by_email(self, email: str) -> list[str]:
        """The customers with this email (classic search, exact match)."""
        body = self.get(f"{self.base}/customers?email={quote(email, safe='')}&match=exact&limit=10",
                        "GET /customers?email")
        rows = body.get("data") if isinstance(body, dict) else body
        return [str(row["id"]) for row in rows or [] if isinstance(row, dict) and row.get("id")]

    def get_customers(self, ids: list[str], paths: Iterable[str] = ()) -> list[dict]:
        """Full profiles for `ids` (classic `GET /customers/{id}`), a few requests at a time, with the
        `fields=` extras that the loyalty field `paths` need (e.g. expiring points, not in a profile otherwise).

        A customer Antavo no longer has (404, e.g. deleted since it changed) comes back as a record
        with only its id and a `_held` reason, so that it is held back visibly instead of failing
        every other customer of the run.
        """

        extras = sorted({extra for path in paths for prefix, extra in PROFILE_EXTRAS.items() if path.startswith(prefix)})
        query = f"?fields={quote(','.join(extras), safe='')}" if extras else ""  # commas percent-encoded, for signing

        def one(customer_id: str) -> dict:
            try:
                body = self.get(f"{self.base}/customers/{quote(customer_id, safe='')}{query}", "GET /customers/{id}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                return {"id": customer_id, NOT_FOUND: True,
                        HELD: [f"Antavo has no customer {customer_id} (404 Not Found)"]}
            return normalise_customer(body)

        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(one, ids))

    # -- events --------------------------------------------------------------------------------
    def iter_events(self, start: datetime, end: datetime, limit: int = 100) -> Iterator[list[dict]]:
        """Every event in [start, end), oldest first, a page at a time (`GET /customers/-/events`)."""
        offset = 0
        while True:
            url = (
                f"{self.base}/customers/-/events?timestamp.gte={quote(_iso(start))}"
                f"&timestamp.lt={quote(_iso(end, up=True))}&order=asc&limit={limit}&offset={offset}"
            )
            body = self.get(url, f"GET /customers/-/events offset={offset}")
            rows = body.get("data")
            if not isinstance(rows, list):
                raise ApiError("GET /customers/-/events: response has no data list", retryable=True)
            if rows:
                yield [normalise_event(e) for e in rows]
            if len(rows) < limit:
                return
            offset += len(rows)

    def get_claimed_rewards(self, customer_id: str) -> list[dict]:
        body = self.get(
            f"{self.base}/customers/{quote(customer_id, safe='')}/rewards?limit=100",
            "GET /customers/{id}/rewards",
        )
        rows = body.get("data") if isinstance(body, dict) else body
        return rows if isinstance(rows, list) else []


def _check_body(response: requests.Response) -> Any:
    """The parsed body. Antavo can answer 200 with an error envelope: a failure, not data.

    Bytes that are not UTF-8 are never guessed at (that sends garbled names): they are kept as
    lone surrogates, and `normalise_customer` holds back the record that contains them.
    """
    try:
        body = json.loads(response.content.decode("utf-8", "surrogateescape"))
    except ValueError:
        raise ApiError("response is not JSON", status=response.status_code, retryable=True) from None
    if isinstance(body, dict) and "error" in body:
        error = body["error"] if isinstance(body["error"], dict) else {"message": str(body["error"])}
        raise ApiError(
            f"error in a {response.status_code} response: {error.get('type', '')} "
            f"{error.get('code', '')} {error.get('message', '')}".strip(),
            status=response.status_code,
            retryable=error.get("resendable", True) is not False,
        )
    return body


def _oldest_first(status: str) -> str:
    """The Read API query that lists customers by creation, of one status (any when empty)."""
    query = f"{quote('sort[0][field]')}=created_at&{quote('sort[0][direction]')}=asc"
    if status:
        query += f"&{quote('filter[status][eq]')}={status}"
    return query


def _customer_page_tail(tail: set[str], listed: list) -> set[str]:
    """The ids this Read API page ends on; ListShifted when it moved past the `tail` of the page before."""
    ids = [str(c.get("_id")) for c in listed if isinstance(c, dict)]
    if moved_past_overlap(tail, ids):
        raise ListShifted(f"GET /v1/customers: the list moved by more than {PAGE_OVERLAP} customers between "
                          "two pages (customers left it while it was read); it is read again")
    return overlap_tail(ids)


def _only(listed: list, ids: Collection[str] | None) -> list:
    """The customers on a page whose id is among `ids` (all of them when there are no `ids`)."""
    if ids is None:
        return listed
    return [c for c in listed if isinstance(c, dict) and str(c.get("_id")) in ids]


def _next_page(body: dict) -> str | None:
    return ((body.get("metadata") or {}).get("pagination") or {}).get("next")


def _check_customer_page(body: Any) -> None:
    """A Read API page must hold a customer list, and cannot be empty while another page is announced."""
    payload = body.get("payload") if isinstance(body, dict) else None
    customers = payload.get("customers") if isinstance(payload, dict) else None
    if not isinstance(customers, list):
        raise ApiError("GET /v1/customers: the response has no payload.customers list", retryable=True)
    if not customers and _next_page(body):
        raise ApiError("GET /v1/customers: an empty page although a next page is announced", retryable=True)


def _iso(moment: datetime, up: bool = False) -> str:
    """Whole seconds, as Antavo's filters take them; an upper bound is rounded up, so that nothing changed in
    the bound's last fraction of a second falls between two runs."""
    if up and moment.microsecond:
        moment += timedelta(seconds=1)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
