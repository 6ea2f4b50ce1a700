"""A deterministic synthetic Antavo population in the Loyalty Read API's shape.

Customer `i` is always the same for the same seed: nested tiers keyed by structure, accounts keyed
by account, expiring points, custom properties, unicode names, and a small, known share of missing
or malformed values (see DEFECTS) so that quality handling can be checked.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

FIRST = ["Jane", "John", "Zoë", "Łukasz", "Amélie", "Søren", "Björn", "Aiko", "Mário", "Chloé",
         "Oğuz", "Ana", "Nguyễn", "Siobhán", "Zhang", "Olga", "Émile", "Ingrid", "José", "Fatima"]
LAST = ["Smith", "Müller", "García", "Nowak", "O'Brien", "Kowalski", "Dubois", "Østergaard",
        "Yılmaz", "Rossi", "Tanaka", "Jensen", "Novák", "Silva", "Schröder", "Lefèvre"]
COUNTRIES = ["GB", "DE", "FR", "ES", "PL", "IT", "DK", "SE", "US", "NL", "IE", "HU"]
TIERS = [("bronze", {"en": "Bronze", "de": "Bronze"}), ("silver", {"en": "Silver", "de": "Silber"}),
         ("gold", {"en": "Gold", "de": "Gold"}), ("platinum", {"en": "Platinum", "de": "Platin"})]
STORES = ["london-01", "berlin-02", "paris-03", "madrid-04"]
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

# one in `every` customers carries this defect (offsets keep them apart for small populations)
DEFECTS = {
    "bad_email": (157, 7),
    "missing_email": (211, 11),
    "bad_birth_date": (173, 13),
    "bad_phone": (191, 17),
    "bad_country": (199, 19),
}


def defects_of(index: int) -> list[str]:
    return [name for name, (every, offset) in DEFECTS.items() if index % every == offset]


def customer_id(index: int) -> str:
    return f"c{index:08d}"


def make_customer(index: int, seed: int = 7) -> dict:
    # every draw from `rng` happens in the same order as ever: customer `i` of a seed never changes
    rng = random.Random(seed * 1_000_003 + index)
    first, last = rng.choice(FIRST), rng.choice(LAST)
    created = EPOCH + timedelta(minutes=index * 7)
    updated = created + timedelta(days=rng.randint(0, 30), seconds=rng.randint(0, 86399))
    tier_no = rng.randrange(len(TIERS))
    score = rng.randint(0, 20000)
    spent = rng.randint(0, score)
    customer = {
        "_id": customer_id(index),
        "external_ids": {"crm_id": f"CRM{index:07d}"},
        "email": f"{first.lower()}.{index}@example.com".replace("'", ""),
        "first_name": first,
        "last_name": last,
        "handler": first,
        "status": "active",
        **_person(rng),
        "membership_id": [f"MA{index:07d}"],
        **_points(rng, score, spent),
        **_purchases(rng, created, updated),
        "created_at": created.isoformat(),
        "updated_at": updated.isoformat(),
        "optin_at": created.isoformat(),
        "labels": rng.sample(["VIP", "Newsletter", "App user"], rng.randint(0, 2)),
        "properties": {
            "city": rng.choice(["London", "Berlin", "Paris", "Kraków", "Malmö"]),
            "favourite_store": rng.choice(STORES),
            "newsletter": rng.choice([True, False]),
        },
        "tiers": {"basic_structure": _tier(rng, tier_no, created, score, spent)},
        "accounts": {
            "prestige_balance": {
                "name": "Prestige balance", "type": "standard", "earned": score, "reserved": 0,
                "spent": spent, "pending": 0, "expired": 0, "negative_points": False,
            }
        },
        "extensions": {"expiring_points": {"total": rng.randint(0, 500)}},
        "rewards": {},
    }
    _break(customer, defects_of(index), first, index)
    return customer


def _person(rng: random.Random) -> dict:
    return {
        "gender": rng.choice(["male", "female", "female", "male", None]),
        "language": rng.choice(["en", "de", "fr"]),
        "currency": "GBP",
        "country": rng.choice(COUNTRIES),
        "birth_date": f"{rng.randint(1950, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "mobile_phone": f"+44 7700 {rng.randint(100000, 999999)}",
    }


def _points(rng: random.Random, score: int, spent: int) -> dict:
    return {"score": score, "spent": spent, "reserved": 0, "expired": rng.randint(0, 100), "pending": rng.randint(0, 50)}


def _purchases(rng: random.Random, created: datetime, updated: datetime) -> dict:
    return {
        "purchase_total": round(rng.uniform(0, 5000), 2),
        "purchase_count": rng.randint(0, 40),
        "purchase_first_date": (created + timedelta(days=1)).strftime("%Y-%m-%d"),
        "purchase_last_date": (updated - timedelta(days=1)).strftime("%Y-%m-%d"),
    }


def _tier(rng: random.Random, tier_no: int, created: datetime, score: int, spent: int) -> dict:
    tier_id, tier_name = TIERS[tier_no]
    next_tier = TIERS[tier_no + 1] if tier_no + 1 < len(TIERS) else None
    return {
        "_id": tier_id,
        "name": tier_name,
        "since": (created + timedelta(days=2)).isoformat(),
        "threshold": tier_no * 1000,
        "points": score - spent,
        "expdate": "2027-06-30",
        "manual": False,
        "next": {"id": next_tier[0], "name": next_tier[1]["en"], "points": rng.randint(1, 999)} if next_tier else {},
    }


def _break(customer: dict, defects: list[str], first: str, index: int) -> None:
    """The customer with her DEFECTS: a field set to a bad value, or (None) left out."""
    bad_values = {
        "bad_email": ("email", f"{first.lower()}.{index}.example.com"),
        "missing_email": ("email", None),
        "bad_birth_date": ("birth_date", "31/12/1990"),
        "bad_phone": ("mobile_phone", "07700 900"),
        "bad_country": ("country", "UK"),
    }
    for defect in defects:
        name, value = bad_values[defect]
        if value is None:
            customer.pop(name)
        else:
            customer[name] = value


def make_population(size: int, seed: int = 7) -> list[dict]:
    return [make_customer(i, seed) for i in range(size)]


def to_classic(customer: dict) -> dict:
    """The same customer as the classic Customer API returns it (arrays, unix timestamps)."""
    classic = {k: v for k, v in customer.items() if k not in ("_id", "handler", "tiers", "accounts")}
    classic["id"] = customer["_id"]
    classic["nickname"] = customer.get("handler")
    classic["status"] = str(customer.get("status", "")).capitalize()
    for name in ("created_at", "updated_at", "optin_at", "last_login_at"):
        if isinstance(customer.get(name), str):
            classic[name] = int(datetime.fromisoformat(customer[name]).timestamp())
    classic["tiers"] = [
        {**tier, "id": tier.get("_id"), "structure": {"id": structure, "name": structure}}
        for structure, tier in (customer.get("tiers") or {}).items()
    ]
    classic["accounts"] = [{**acc, "id": acc_id} for acc_id, acc in sorted((customer.get("accounts") or {}).items())]
    for tier in classic["tiers"]:
        tier.pop("_id", None)
    return classic
