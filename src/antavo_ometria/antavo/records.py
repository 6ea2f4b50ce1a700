"""Antavo's records in the one shape the sync reads: customers from either API, and events.

A record Antavo returned that cannot be used as it is (bytes that are not UTF-8, a field of the wrong kind)
is not dropped: it carries its reasons under `HELD`, and the quality gate holds it back with them.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

_UNIX_FIELDS = ("created_at", "updated_at", "optin_at", "optout_at", "last_login_at")
HELD = "_held"  # reasons why a record Antavo returned cannot be used as it is; the quality gate holds it back
NOT_FOUND = "_not_found"  # set on a customer Antavo answered 404 for
# undecodable bytes (kept as lone surrogates by "surrogateescape"), or a lone surrogate Antavo escaped in its JSON
_NOT_UNICODE = re.compile("[\ud800-\udfff]")


def _invalid_text(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """`value` with undecodable bytes replaced by U+FFFD, and the paths where there were any."""
    if isinstance(value, str):
        return (_NOT_UNICODE.sub("\ufffd", value), [path or "value"]) if _NOT_UNICODE.search(value) else (value, [])
    found: list[str] = []
    if isinstance(value, dict):
        cleaned = {}
        for key, item in value.items():
            cleaned[key], bad = _invalid_text(item, f"{path}.{key}" if path else str(key))
            found += bad
        return cleaned, found
    if isinstance(value, list):
        items = [_invalid_text(item, path) for item in value]
        return [item for item, _ in items], [p for _, bad in items for p in bad]
    return value, found


def _usable(raw: Any, what: str) -> tuple[dict, list[str]]:
    """A record from a response as a dict, with the reasons it cannot be used (not an object, bad bytes)."""
    if not isinstance(raw, dict):
        return {"id": None}, [f"Antavo returned {json.dumps(raw)[:40]} where a {what} belongs"]
    record, bad = _invalid_text(raw)
    return record, [f"{path}: Antavo sent text that is not valid UTF-8" for path in bad]


def normalise_customer(raw: dict) -> dict:
    """Classic and Read API customers → one shape (Read API names, keyed tiers and accounts).

    `_id`→`id`, `nickname`→`handler`, unix-second timestamps → ISO 8601, lower-case status and
    gender, and the classic arrays of tiers and accounts keyed by structure and account ID. A record
    that cannot be used as it is (not an object, bytes that are not UTF-8) gets its reasons in `_held`.
    """
    customer, problems = _usable(raw, "customer")
    if problems:
        customer[HELD] = customer.get(HELD, []) + problems
    _read_api_names(customer)
    _iso_timestamps(customer)
    for name in ("status", "gender"):
        if isinstance(customer.get(name), str):
            customer[name] = customer[name].lower()
    _expiring_points_in_extensions(customer)
    _keyed_tiers_and_accounts(customer)
    return customer


def _read_api_names(customer: dict) -> None:
    """`_id` → `id` (as text) and `nickname` → `handler`."""
    if "_id" in customer:
        customer["id"] = customer.pop("_id")
    if "id" in customer and customer["id"] is not None:
        customer["id"] = str(customer["id"])
    if "nickname" in customer and "handler" not in customer:
        customer["handler"] = customer.pop("nickname")


def _iso_timestamps(customer: dict) -> None:
    for name in _UNIX_FIELDS:
        value = customer.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                customer[name] = datetime.fromtimestamp(value, UTC).isoformat()
            except (OverflowError, OSError, ValueError):
                pass  # not a plausible time: left as it is, for the quality gate to hold back


def _expiring_points_in_extensions(customer: dict) -> None:
    """Classic `fields=expiring_points` moves to the Read API's place for it."""
    if isinstance(customer.get("expiring_points"), dict):
        extensions = customer.setdefault("extensions", {})
        if isinstance(extensions, dict):
            extensions.setdefault("expiring_points", customer.pop("expiring_points"))


def _keyed_tiers_and_accounts(customer: dict) -> None:
    """The classic arrays of tiers and accounts, keyed by tier structure and account ID as the Read API keys them."""
    tiers = customer.get("tiers")
    if isinstance(tiers, list):
        customer["tiers"] = {
            _structure_id(t): {
                **{k: v for k, v in t.items() if k not in ("id", "structure")}, "_id": t.get("id")
            }
            for t in tiers
            if isinstance(t, dict)
        }
    accounts = customer.get("accounts")
    if isinstance(accounts, list):
        customer["accounts"] = {
            a.get("id"): {k: v for k, v in a.items() if k != "id"} for a in accounts if isinstance(a, dict)
        }


def _structure_id(tier: dict) -> Any:
    """The tier structure a classic tier belongs to: `structure.id`, or `structure` given as a bare ID."""
    structure = tier.get("structure")
    if isinstance(structure, dict):
        return structure.get("id") or tier.get("id")
    return structure if isinstance(structure, str) and structure else tier.get("id")


def normalise_event(raw: dict) -> dict:
    """Classic event feed item → `{id, action, customer_id, timestamp, points, properties{...}}`.

    An event that cannot be delivered as it is (no customer, no usable timestamp, bad bytes) carries
    its reasons in `_held`.
    """
    raw, problems = _usable(raw, "event")
    props = raw.get("properties")
    if isinstance(props, list):  # classic feed: [{name, label, value}, ...]
        props = {p.get("name"): p.get("value") for p in props if isinstance(p, dict)}
    customer = raw.get("Customer") or raw.get("customer")
    customer_id = customer.get("id") if isinstance(customer, dict) else customer
    event = {
        "id": str(raw.get("id") or raw.get("_id") or ""),
        "action": raw.get("action"),
        "customer_id": str(customer_id) if customer_id not in (None, "") else None,
        "timestamp": raw.get("timestamp"),
        "points": raw.get("points"),
        "properties": props if isinstance(props, dict) else {},
    }
    if event["customer_id"] is None:
        problems.append("the event names no customer")
    if not event["id"]:
        problems.append("the event has no id")
    try:
        event_time(event)
    except (TypeError, ValueError):
        problems.append(f"the event's timestamp {event['timestamp']!r} is not a date-time")
        event["timestamp"] = None
    if problems:
        event[HELD] = problems
    return event


def event_time(event: dict) -> datetime:
    """An event's moment in UTC (Antavo's timestamps are UTC; one with another offset is converted, so that the state
    store, which keeps UTC wall clocks, compares like with like)."""
    moment = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
