"""The Ometria side of the sandbox: `POST /v2/push` validated as Ometria documents it.

Whole-request problems (not an array, over 100 records, mixed types) answer 400. Each record is then
checked on its own: one that breaks the contract counts as `rejected` and its reason is listed at
`GET /v2/push/_errors` as `{error_message, error_path}`; the others are stored (upsert by collection
and id, merged when `@merge` is true). Over the configured rate the answer is 429. What was accepted
can be read back at `/_sandbox/contacts` and `/_sandbox/events`; `POST /_sandbox/reject {"ids": [...]}`
makes Ometria reject those records (by `id`) until it is called again.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections import Counter, deque
from datetime import date, datetime
from functools import cache
from importlib import resources

from antavo_ometria_tools.sandbox.server import App, Request, Response

# Ometria's rules, written here from its public documentation (see the project's API reference notes), not
# taken from the sync's own code: a sandbox that shared the sync's rules could not catch a wrong one.
MAX_RECORDS = 100  # records per push request
MAX_RECORD_BYTES = 60 * 1024  # "60 KB" per record, read as 1024-byte kilobytes: the sync keeps to 60,000 bytes
RECORD_TYPES = {"contact", "order", "product", "custom_event"}
OPTIN = {"EXPLICITLY_OPTEDIN", "EXPLICITLY_OPTEDOUT", "NOT_SPECIFIED"}
# built-in contact fields (top level) and the kind of value each takes
BUILTIN_FIELDS = {
    "email": "email", "customer_id": "string", "prefix": "string", "firstname": "string", "middlename": "string",
    "lastname": "string", "gender": "gender", "date_of_birth": "date", "country_id": "country",
    "phone_number": "phone", "timezone": "string", "store_ids": "list", "timestamp_acquired": "datetime",
    "timestamp_subscribed": "datetime", "timestamp_unsubscribed": "datetime", "marketing_optin": "optin",
}
ENVELOPE_KEYS = {"@type", "@collection", "@merge", "@force_optin", "@add_to_lists", "@remove_from_lists",
                 "id", "properties", "channels"}
# SMS preferences: "channels": {"sms": {...}}
SMS_FIELDS = {"allow_marketing": "boolean", "allow_transactional": "boolean", "dt_updated_marketing": "datetime",
              "dt_updated_transactional": "datetime"}
LISTS = [{"id": "8400", "title": "Loyalty members", "type": "STATIC", "status": "ACTIVE", "size": 0},
         {"id": "8401", "title": "Lapsed loyalty members", "type": "DYNAMIC", "status": "ACTIVE", "size": 0}]
# custom contact fields created in the sandbox account: field ID → value type
DEFAULT_CUSTOM_FIELDS = {
    "loyalty_tier": "string", "loyalty_tier_id": "string", "loyalty_points": "number",
    "loyalty_points_spent": "number", "next_tier": "string", "points_to_next_tier": "number",
    "expiring_points": "number", "prestige_earned": "number", "city": "string",
    "favourite_store": "string", "newsletter": "boolean", "member_since": "datetime",
    "last_purchase": "date", "purchase_count": "number", "purchase_total": "number", "language": "string",
    "crm_id": "string", "tier_since": "datetime", "labels": "list",
}
# an address as mail systems take it: no spaces, one @, a dotted host name whose last label is letters
_EMAIL = re.compile(r"^[^\s@]{1,64}@(?=.{1,253}$)(?:[^\W_](?:(?:[^\W_]|-)*[^\W_])?\.)+[^\W\d_]{2,}$")
_E164 = re.compile(r"^\+[1-9]\d{1,14}$")  # ITU-T E.164: a + and at most 15 digits
MAX_EXACT_NUMBER = 2**53  # a JSON number past it has lost digits on the way


@cache
def countries() -> frozenset[str]:
    """ISO 3166-1 alpha-2 codes, from the IANA time zone database's own table (the tzdata package)."""
    table = resources.files("tzdata").joinpath("zoneinfo", "iso3166.tab").read_text(encoding="utf-8")
    return frozenset(line.split("\t")[0] for line in table.splitlines() if line and not line.startswith("#"))


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _is_iso(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _is_date(value: object) -> bool:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return False
    try:
        date.fromisoformat(value)
        return True
    except ValueError:
        return False


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and abs(value) <= MAX_EXACT_NUMBER)


CHECKS = {
    "string": lambda v: isinstance(v, str),
    "email": lambda v: isinstance(v, str) and _EMAIL.match(v) is not None,
    "gender": lambda v: v in ("m", "f"),
    "date": _is_date,
    "datetime": _is_iso,
    "country": lambda v: isinstance(v, str) and v in countries(),
    "phone": lambda v: isinstance(v, str) and _E164.match(v) is not None,
    "list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "optin": lambda v: v in OPTIN,
    "number": _is_number,
    "integer": lambda v: isinstance(v, int) and _is_number(v),
    "boolean": lambda v: isinstance(v, bool),
}


class OmetriaApp(App):
    def __init__(self, api_key: str, requests_per_second: float = 0.0,
                 custom_fields: dict[str, str] | None = None, queue_limit: int = 50_000):
        super().__init__()
        self.api_key = api_key
        self.rate = requests_per_second
        self.custom_fields = dict(DEFAULT_CUSTOM_FIELDS if custom_fields is None else custom_fields)
        self.queue_limit = queue_limit
        self.on_push = None  # called with the number of pushes so far, after each one (for fault scenarios)
        self.reject_ids: set[str] = set()  # records Ometria refuses, e.g. an email owned by another contact
        self.refuse_requests = 0  # the next this many pushes are answered 400 as a whole (a proxy, a bad minute)
        # Ometria does not say which invalid records count as `rejected` in the answer and which are only listed
        # at /v2/push/_errors later; with this set, an invalid record is counted accepted, listed, and not stored
        self.validate_later = False
        self.contacts: dict[tuple[str, str], dict] = {}
        self.forced: dict[tuple[str, str], int] = {}  # listing → the push that last forced its marketing_optin
        self.events: dict[str, dict] = {}
        self.received = Counter()  # (type, id) → times accepted
        self.accepted_at: dict[str, float] = {}  # custom event id → when it was first accepted (epoch seconds)
        # every accepted record in order: (type, id, digest of the record, whether the client ever read the answer)
        self.deliveries: list[tuple[str, str, str, bool]] = []
        self.errors: deque = deque(maxlen=100)
        self.pushes = 0
        self.refused = 0  # requests with a wrong API key
        self.throttled = 0
        self._window: deque = deque()
        self._rate_lock = threading.Lock()

    def snapshot(self) -> dict:
        with self.lock:
            return {"contacts": [[c, i, v] for (c, i), v in self.contacts.items()], "events": self.events,
                    "forced": [[c, i, n] for (c, i), n in self.forced.items()]}

    def restore(self, saved: dict) -> None:
        with self.lock:
            self.contacts = {(c, i): v for c, i, v in saved["contacts"]}
            self.events = dict(saved["events"])
            self.forced = {(c, i): n for c, i, n in saved.get("forced", [])}

    def consent_of(self, email: str) -> str | None:
        """The profile's marketing consent, resolved over its listings in every collection as Ometria documents
        it: a forced listing wins (the latest forced); else any opt-out wins; else an opt-in."""
        with self.lock:
            listings = {key: c["marketing_optin"] for key, c in self.contacts.items()
                        if c.get("email") == email and c.get("marketing_optin")}
            forced = [key for key in listings if key in self.forced]
        if forced:
            return listings[max(forced, key=self.forced.__getitem__)]
        for value in ("EXPLICITLY_OPTEDOUT", "EXPLICITLY_OPTEDIN", "NOT_SPECIFIED"):
            if value in listings.values():
                return value
        return None

    def handle(self, request: Request) -> Response:
        if request.path.startswith("/_sandbox/"):
            return self._control(request)
        if request.header("X-Ometria-Auth") != self.api_key:
            self.refused += 1
            return Response(403, {"status": "error", "message": "Forbidden: invalid API key"})
        if request.path == "/v2/push" and request.method == "POST":
            if self._over_rate():
                self.throttled += 1
                return Response(429, {"status": "error", "message": "Too many requests"})
            return self._push(request)
        if request.path == "/v2/push/_errors" and request.method == "GET":
            with self.lock:
                return Response(200, list(self.errors))
        if request.path == "/v2/lists" and request.method == "GET":
            return Response(200, LISTS)
        return Response(404, {"status": "error", "message": "not found"})

    def _over_rate(self) -> bool:
        """A sliding one-second window: more than `rate` pushes in it is over the limit."""
        if not self.rate:
            return False
        with self._rate_lock:
            now = time.monotonic()
            while self._window and now - self._window[0] >= 1.0:
                self._window.popleft()
            if len(self._window) >= self.rate:
                return True
            self._window.append(now)
            return False

    def _push(self, request: Request) -> Response:
        with self.lock:
            if self.refuse_requests > 0:
                self.refuse_requests -= 1
                return Response(400, {"status": "error", "message": "Bad Request"})
        try:  # strict JSON: NaN and Infinity are not JSON (RFC 8259)
            records = json.loads(request.body, parse_constant=_not_json)
        except ValueError:
            return Response(400, {"status": "error", "message": "Payload invalid: body is not JSON"})
        if not isinstance(records, list) or not records:
            return Response(400, {"status": "error", "message": "Payload invalid: expected a non-empty array"})
        if len(records) > MAX_RECORDS:
            return Response(400, {"status": "error",
                                  "message": f"Payload invalid: at most {MAX_RECORDS} records per request"})
        types = {r.get("@type") if isinstance(r, dict) else None for r in records}
        if len(types) != 1 or next(iter(types)) not in RECORD_TYPES:
            return Response(400, {"status": "error", "message": "Payload invalid: one record type per request"})
        accepted = rejected = 0
        small = len(request.body) <= MAX_RECORD_BYTES  # then no record in it can be too large
        with self.lock:
            self.pushes += 1
            for record in records:
                problems = self._check(record, small)
                if problems:
                    accepted += self.validate_later
                    rejected += not self.validate_later
                    self.errors.extend({"error_message": m, "error_path": p} for p, m in problems)
                    continue
                accepted += 1
                self._store(record)
                digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
                self.deliveries.append((record["@type"], record["id"], digest, not request.late))
        if self.on_push is not None:
            self.on_push(self.pushes)
        headers = {"X-QueueSize-Limit": str(self.queue_limit), "X-QueueSize-Remaining": str(self.queue_limit)}
        return Response(200, {"status": "OK", "request_id": str(uuid.uuid4()),
                              "accepted": accepted, "rejected": rejected}, headers)

    def _check(self, record: dict, small: bool = False) -> list[tuple[str, str]]:
        refused = self._refused(record, small)
        if refused:
            return refused
        if record["@type"] == "custom_event":
            return self._check_event(record)
        if record["@type"] != "contact":
            return []
        return self._check_contact(record)

    def _refused(self, record: dict, small: bool) -> list[tuple[str, str]]:
        """Whatever the type: a record too large, one without an id, one whose identity Ometria refuses."""
        if not small and len(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_RECORD_BYTES:
            return [("root", "Payload invalid: Record is too large.")]
        if not isinstance(record.get("id"), str) or not record["id"]:
            return [("root > id", "not a valid value")]
        if record["id"] in self.reject_ids:
            return [("root > email", "identifier is already owned by another contact")]
        return []

    def _check_contact(self, record: dict) -> list[tuple[str, str]]:
        fields = {key: value for key, value in record.items() if key not in ENVELOPE_KEYS}
        # legacy: custom fields at the top
        problems = _field_problems(fields, lambda key: BUILTIN_FIELDS.get(key) or self.custom_fields.get(key),
                                   "root", "unknown field")
        problems += _envelope_problems(record)
        properties = record.get("properties", {})
        if not isinstance(properties, dict):
            return problems + [("root > properties", "not a valid value")]
        return problems + _field_problems(properties, self.custom_fields.get, "root > properties",
                                          "unknown custom field")

    def _check_event(self, record: dict) -> list[tuple[str, str]]:
        problems = []
        event_type = record.get("event_type")
        if not isinstance(event_type, str) or not 0 < len(event_type) < 32:
            problems.append(("root > event_type", "not a valid value"))
        if not _is_iso(record.get("timestamp")):
            problems.append(("root > timestamp", "not a valid value"))
        if not (record.get("identity_email") or record.get("identity_account_id") or record.get("profile_id")):
            problems.append(("root", "custom event has no identity"))
        if not isinstance(record.get("properties", {}), dict):
            problems.append(("root > properties", "not a valid value"))
        return problems

    def _store(self, record: dict) -> None:
        kind = record["@type"]
        self.received[(kind, record["id"])] += 1
        if kind == "custom_event":
            self.events[record["id"]] = record
            self.accepted_at.setdefault(record["id"], time.time())
        elif kind == "contact":
            self._store_contact(record)

    def _store_contact(self, record: dict) -> None:
        """An upsert by collection and id; with `@merge`, merged into what is stored."""
        key = (record.get("@collection", ""), record["id"])
        stored = self.contacts.get(key) if record.get("@merge") else None
        if stored is None:
            stored = {}
        fields = {k: v for k, v in record.items() if not k.startswith("@")}
        merged = {**stored, **{k: v for k, v in fields.items() if k not in ("properties", "channels")}}
        if "channels" in fields:
            merged["channels"] = {"sms": {**stored.get("channels", {}).get("sms", {}), **fields["channels"].get("sms", {})}}
        if record.get("@force_optin") and "marketing_optin" in fields:
            self.forced[key] = self.pushes
        elif key in self.forced and "marketing_optin" in stored:  # a forced value is not overridden unforced
            merged["marketing_optin"] = stored["marketing_optin"]
        properties = {**stored.get("properties", {}), **fields.get("properties", {})}
        if properties:
            merged["properties"] = properties
        _change_lists(merged, record)
        self.contacts[key] = merged

    # -- control (unsigned, for tests) ---------------------------------------------------------
    def _control(self, request: Request) -> Response:
        method, answer = self.CONTROLS.get(request.path, (None, None))
        if answer is None or method not in (None, request.method):
            return Response(404, {"error": "unknown sandbox control"})
        with self.lock:
            return answer(self, request)

    def _contacts_stored(self, request: Request) -> Response:
        return Response(200, [{"@collection": c, **v} for (c, _), v in sorted(self.contacts.items())])

    def _events_stored(self, request: Request) -> Response:
        return Response(200, sorted(self.events.values(), key=lambda e: e["id"]))

    def _stats(self, request: Request) -> Response:
        duplicates = sum(1 for n in self.received.values() if n > 1)
        return Response(200, {"pushes": self.pushes, "contacts": len(self.contacts),
                              "events": len(self.events), "throttled": self.throttled,
                              "records_received_more_than_once": duplicates})

    def _reject(self, request: Request) -> Response:
        # the records Ometria refuses from now on (e.g. an identity owned by another contact); [] ends it
        self.reject_ids = {str(i) for i in (request.json() or {}).get("ids", [])}
        return Response(200, {"reject_ids": sorted(self.reject_ids)})

    def _faults(self, request: Request) -> Response:
        faults = json.loads(request.body or b"{}")  # {"refuse_requests": n, ...}
        self.refuse_requests = int(faults.get("refuse_requests", self.refuse_requests))
        self.validate_later = bool(faults.get("validate_later", self.validate_later))
        for field in faults.get("delete_custom_fields", []):  # a field deleted in the account
            self.custom_fields.pop(field, None)
        return Response(200, {"refuse_requests": self.refuse_requests, "validate_later": self.validate_later,
                              "custom_fields": sorted(self.custom_fields)})

    def _reset(self, request: Request) -> Response:
        for kept in (self.contacts, self.events, self.received, self.errors, self.accepted_at, self.deliveries):
            kept.clear()
        self.pushes = self.throttled = 0
        return Response(200, {"reset": True})

    # path → (the method it takes, None for any; what answers it)
    CONTROLS = {
        "/_sandbox/contacts": (None, _contacts_stored),
        "/_sandbox/events": (None, _events_stored),
        "/_sandbox/stats": (None, _stats),
        "/_sandbox/reject": ("POST", _reject),
        "/_sandbox/faults": ("POST", _faults),
        "/_sandbox/reset": ("POST", _reset),
    }


def _field_problems(fields: dict, kind_of, path: str, unknown: str) -> list[tuple[str, str]]:
    """Each field whose kind `kind_of` does not know, or whose value is not of its kind (null always is)."""
    problems = []
    for key, value in fields.items():
        kind = kind_of(key)
        if kind is None:
            problems.append((f"{path} > {key}", unknown))
        elif value is not None and not CHECKS[kind](value):
            problems.append((f"{path} > {key}", "not a valid value"))
    return problems


def _envelope_problems(record: dict) -> list[tuple[str, str]]:
    """A contact's `@` keys and channels."""
    problems = []
    if not isinstance(record.get("@collection", ""), str):
        problems.append(("root > @collection", "not a valid value"))
    if not isinstance(record.get("@force_optin", False), bool):
        problems.append(("root > @force_optin", "not a valid value"))
    problems += _channel_problems(record.get("channels", {}))
    known_lists = {str(row["id"]) for row in LISTS}
    for action in ("@add_to_lists", "@remove_from_lists"):
        lists = record.get(action, [])
        if not isinstance(lists, list) or not all(isinstance(x, int) and str(x) in known_lists for x in lists):
            problems.append((f"root > {action}", "not a valid value"))
    return problems


def _channel_problems(channels: object) -> list[tuple[str, str]]:
    if not isinstance(channels, dict):
        return [("root > channels", "not a valid value")]
    problems = [(f"root > channels > {name}", "unknown channel") for name in channels if name != "sms"]
    sms = channels.get("sms", {})
    if not isinstance(sms, dict):
        return problems + [("root > channels > sms", "not a valid value")]
    return problems + _field_problems(sms, SMS_FIELDS.get, "root > channels > sms", "unknown field")


def _change_lists(contact: dict, record: dict) -> None:
    """The record's `@add_to_lists` and `@remove_from_lists` applied to the contact's lists."""
    for list_id in record.get("@add_to_lists", []):
        contact.setdefault("lists", [])
        if list_id not in contact["lists"]:
            contact["lists"].append(list_id)
    for list_id in record.get("@remove_from_lists", []):
        if list_id in contact.get("lists", []):
            contact["lists"].remove(list_id)
