"""Golden tests: Antavo customers → the exact Ometria records, in both payload modes; and conversions."""

from __future__ import annotations

import pandas as pd
import pytest

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.ometria.formats import to_date, to_datetime, to_gender, to_phone
from antavo_ometria.sync.contacts.transform import customer_columns, transform
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria_tools.preview import payloads

TABLE = """loyalty_field,remote_field,format,overwrite_empty
email,email,,
first_name,firstname,,
last_name,lastname,,
gender,gender,,
birth_date,date_of_birth,,
country,country_id,,
mobile_phone,phone_number,,
optin_at,timestamp_subscribed,,
score,loyalty_points,,
purchase_count,purchase_count,integer,
properties.newsletter,newsletter,boolean,
properties.city,city,,yes
labels,labels,list,
"""
V2_ROWS = """tiers.basic_structure.name,loyalty_tier,,
tiers.basic_structure.next.points,points_to_next_tier,,
extensions.expiring_points.total,expiring_points,,
accounts.prestige_balance.earned,prestige_earned,,
"""

FULL = {  # Read API shape, with tiers, accounts, expiring points and a translated tier name
    "_id": "55e5d4dc2cf1901e688b45d3", "email": "zoë.łukasz@example.com", "first_name": "Zoë",
    "last_name": "Łukasiewicz-O'Brien", "gender": "Female", "birth_date": "1990-05-17", "country": "gb",
    "mobile_phone": "+44 7700 900123", "optin_at": "2026-06-28T12:27:03+02:00", "score": 1010,
    "purchase_count": 3.0, "labels": ["Elite member", "VIP"],
    "properties": {"newsletter": "yes", "city": "Kraków"},
    "tiers": {"basic_structure": {"_id": "gold", "name": {"en": "Gold", "de": "Gold (DE)"},
                                  "next": {"id": "platinum", "name": "Platinum", "points": 990}}},
    "accounts": {"prestige_balance": {"name": "Prestige balance", "earned": 9271, "spent": 85}},
    "extensions": {"expiring_points": {"total": 150}},
}
SPARSE = {  # classic shape (unix timestamps, tier array), most fields missing
    "id": 1749, "email": " jsmith@example.com ", "first_name": "John", "gender": None, "optin_at": 1700000000,
    "tiers": [{"id": "bronze", "name": "Bronze", "structure": {"id": "basic_structure"}, "next": {}}],
}
MALFORMED = {
    "_id": "c-bad", "email": "not-an-email", "birth_date": "17/05/1990", "mobile_phone": "12345",
    "country": "UK", "purchase_count": 2.5, "properties": {"newsletter": "perhaps"},
}

ENVELOPE = {"@type": "contact", "@collection": "antavo", "@merge": True, "@add_to_lists": [8400]}
FULL_BUILTINS = {
    "id": "55e5d4dc2cf1901e688b45d3", "email": "zoë.łukasz@example.com", "firstname": "Zoë",
    "lastname": "Łukasiewicz-O'Brien", "gender": "f", "date_of_birth": "1990-05-17", "country_id": "GB",
    "phone_number": "+447700900123", "timestamp_subscribed": "2026-06-28T10:27:03+00:00",
}
FULL_CUSTOM = {"loyalty_points": 1010, "purchase_count": 3, "newsletter": True, "city": "Kraków",
               "labels": ["Elite member", "VIP"]}
SPARSE_BUILTINS = {"id": "1749", "email": "jsmith@example.com", "firstname": "John",
                   "timestamp_subscribed": "2023-11-14T22:13:20+00:00"}


def mapping_for(mappings, mode: str, language: str = "en"):
    rows = TABLE + (V2_ROWS if mode == "v2" else "")
    (mappings / "contacts.csv").write_text(rows)
    (mappings / "settings.toml").write_text(
        f'[ometria]\npayload_mode = "{mode}"\nlist_id = "8400"\n[translations]\nlanguage = "{language}"\n')
    return load_contact_mapping(mappings)


def run(mapping, customers):
    """(id → record sent, id → reasons held back), through the transformation and the quality gate."""
    return payloads([normalise_customer(c) for c in customers], mapping)


def test_golden_legacy(mappings):
    records, held = run(mapping_for(mappings, "legacy"), [FULL, SPARSE, MALFORMED])
    assert records == {
        FULL["_id"]: {**ENVELOPE, **FULL_BUILTINS, **FULL_CUSTOM},
        "1749": {**ENVELOPE, **SPARSE_BUILTINS, "city": None},  # overwrite_empty: an empty city clears Ometria's
    }
    assert list(held) == ["c-bad"]


def test_golden_v2(mappings):
    records, _ = run(mapping_for(mappings, "v2", language="de"), [FULL, SPARSE])
    assert records == {
        FULL["_id"]: {**ENVELOPE, **FULL_BUILTINS, "properties": {
            **FULL_CUSTOM, "loyalty_tier": "Gold (DE)", "points_to_next_tier": 990, "expiring_points": 150,
            "prestige_earned": 9271}},
        "1749": {**ENVELOPE, **SPARSE_BUILTINS, "properties": {"city": None, "loyalty_tier": "Bronze"}},
    }


def test_malformed_values_hold_the_record_back_with_every_reason(mappings):
    _, held = run(mapping_for(mappings, "legacy"), [MALFORMED])
    assert sorted(held["c-bad"].split("; ")) == sorted([
        "email: email = 'not-an-email' is not an email address",
        "date_of_birth: birth_date = '17/05/1990' is not a YYYY-MM-DD date",
        "country_id: country = 'UK' is not an ISO 3166-1 alpha-2 country code",
        "phone_number: mobile_phone = '12345' is not an E.164 phone number",
        "purchase_count: purchase_count = 2.5 is not a whole number",
        "newsletter: properties.newsletter = 'perhaps' is not true or false",
    ])


def test_unconvertible_values_are_kept_for_the_gate_to_judge(mappings):
    mapping = mapping_for(mappings, "legacy")
    frame = transform(customer_columns([normalise_customer(MALFORMED)], mapping.loyalty_fields), mapping)
    assert frame.iloc[0][["date_of_birth", "country_id", "purchase_count", "newsletter"]].tolist() == [
        "17/05/1990", "UK", 2.5, "perhaps"]


def test_missing_and_duplicate_ids_are_held_back(mappings):
    mapping = mapping_for(mappings, "legacy")
    _, held = run(mapping, [{"email": "a@example.com"}, {**FULL}, {**FULL, "email": "b@example.com"}])
    assert held["None"] == "the customer has no id"
    assert held[FULL["_id"]] == f"duplicate customer id '{FULL['_id']}'"


def test_v2_record_never_puts_custom_fields_top_level(mappings):
    mapping = mapping_for(mappings, "v2")
    builtins = {f.remote_field for f in mapping.fields if f.builtin}
    records, _ = run(mapping, [FULL])
    top = set(records[FULL["_id"]]) - set(ENVELOPE) - {"id", "properties"}
    assert top <= builtins


@pytest.mark.parametrize("value, expected", [
    ("2026-07-14T19:41:35+02:00", "2026-07-14T17:41:35+00:00"),
    ("2026-07-14T19:41:35.123Z", "2026-07-14T19:41:35+00:00"),
    ("2026-07-14 19:41:35", "2026-07-14T19:41:35+00:00"),  # Antavo custom Datetime fields
    ("2026-07-14", "2026-07-14T00:00:00+00:00"),
    (1700000000, "2023-11-14T22:13:20+00:00"),  # classic API unix seconds
    (None, None),
])
def test_timestamps_become_iso_8601_with_offset(value, expected):
    values, bad = to_datetime(pd.Series([value], dtype=object), "en")
    assert values[0] == expected and not bad[0]


@pytest.mark.parametrize("value, expected, is_bad", [
    ("1990-05-17", "1990-05-17", False), ("2026-07-14T23:30:00+00:00", "2026-07-14", False),
    ("31/12/1990", None, True), ("", None, False), ("1990-02-30", None, True),
])
def test_dates(value, expected, is_bad):
    values, bad = to_date(pd.Series([value], dtype=object), "en")
    assert (values[0], bool(bad[0])) == (expected, is_bad)


@pytest.mark.parametrize("value, expected, is_bad", [
    ("male", "m", False), ("FEMALE", "f", False), ("f", "f", False), ("other", None, False),
    (None, None, False), ("martian", None, True),
])
def test_gender(value, expected, is_bad):
    values, bad = to_gender(pd.Series([value], dtype=object), "en")
    assert (values[0], bool(bad[0])) == (expected, is_bad)


@pytest.mark.parametrize("value, expected, is_bad", [
    ("+44 7700 900123", "+447700900123", False), ("0044 (7700) 900-123", "+447700900123", False),
    ("07700 900123", None, True), ("+0123456789", None, True),
])
def test_phone_numbers_are_e164(value, expected, is_bad):
    values, bad = to_phone(pd.Series([value], dtype=object), "en")
    assert (values[0], bool(bad[0])) == (expected, is_bad)


def test_contact_bodies_are_the_bytes_pandas_json_writer_gives_for_every_kind_of_value():
    """The columnar encoder joins members per field; each must be what one whole-record write gives."""
    import json as _json

    from antavo_ometria.ometria.payload import ContactShape, encode_contacts
    from antavo_ometria.sync.tables.mapping import FieldMapping

    texts = ["a/b", 'quote " and \\ back', "é 😀 \u2028 \x7f", "Tab\there", "", None, "</script>", "x" * 300]
    columns = {
        "email": texts, "firstname": [*texts[1:], "z"], "lastname": ["ok"] * 8,
        "points": [1, 2**53, -7, None, 0, 2**63, 3, 4], "ratio": [1.5, 0.1 + 0.2, 1e20, None, 2, 3, 4, 5],
        "flag": [True, False, None, True, True, False, None, True], "mixed": [1, "one", True, None, [1], {"a": 1}, 2.5, "x"],
        "labels": [["a/b", 'q"'], None, ["é"], ["x", "y", "z"], ["\n"], ["a"], None, ["b"]],
        "city": [None, "Kraków", None, "Łódź", None, None, "Paris", None],
    }
    frame = pd.DataFrame({"id": [f"c/{i}" for i in range(8)], **columns}, dtype=object)
    builtin = {"email", "firstname", "lastname"}
    fields = [FieldMapping(name, name, "string", name == "city", name in builtin, 2 + i)
              for i, name in enumerate(columns)]
    for v2 in (True, False):
        shape = ContactShape("antavo", "8400", v2, fields)
        expected = []
        for _, row in frame.iterrows():
            carried = [f.remote_field for f in fields if f.overwrite_empty or pd.notna(row[f.remote_field]) is True
                       or isinstance(row[f.remote_field], list)]
            top = ["id"] + [n for n in carried if n in builtin or not v2]
            nested = [n for n in carried if n not in builtin and v2]
            tops = frame.loc[[row.name], top].to_json(orient="records", force_ascii=False, double_precision=15)[1:-2]
            body = '{"@type":"contact","@collection":"antavo","@merge":true,"@add_to_lists":[8400],' + tops[1:]
            if nested:
                body += ',"properties":' + frame.loc[[row.name], nested].to_json(
                    orient="records", force_ascii=False, double_precision=15)[1:-1]
            expected.append((body + "}").encode())
        assert encode_contacts(frame, shape) == expected
        assert all(_json.loads(body)["id"].startswith("c/") for body in expected)
