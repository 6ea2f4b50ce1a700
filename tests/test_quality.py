"""The quality gate: one customer per failure class, the invalid-share threshold, the row-count drop."""

from __future__ import annotations

import json

import pytest

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.ometria.contract import MAX_RECORD_BYTES
from antavo_ometria.sync.contacts.prepare import prepare_contacts
from antavo_ometria.sync.contacts.quality import batch_verdict
from antavo_ometria.sync.contacts.transform import customer_columns
from antavo_ometria.sync.tables.mapping import load_contact_mapping

TABLE = """loyalty_field,remote_field,format,overwrite_empty
email,email,,
first_name,firstname,,
gender,gender,,
birth_date,date_of_birth,,
country,country_id,,
mobile_phone,phone_number,,
optin_at,timestamp_subscribed,,
properties.newsletter,marketing_optin,,
score,loyalty_points,,
properties.notes,notes,,
"""


def good(i: int, **changes) -> dict:
    customer = {"_id": f"c{i}", "email": f"person{i}@example.com", "first_name": "Zoë", "gender": "female",
                "birth_date": "1990-05-17", "country": "GB", "mobile_phone": "+447700900123",
                "optin_at": "2026-01-01T10:00:00+00:00", "score": 10, "properties": {"newsletter": True}}
    for key, value in changes.items():
        if key.startswith("properties."):
            customer["properties"][key.split(".", 1)[1]] = value
        elif value is None:
            customer.pop(key, None)
        else:
            customer[key] = value
    return customer


# one customer per failure class: (customer, the check that must catch it)
BAD = [
    (good(100, _id=None, email="noid@example.com"), "id_missing"),
    (good(101, email="not-an-email"), "email_format"),
    (good(102, email=None), "email_missing"),
    (good(103, birth_date="1990-02-30"), "date_format"),
    (good(104, optin_at="last tuesday"), "datetime_format"),
    (good(105, gender="martian"), "gender"),
    (good(106, country="UK"), "country"),
    (good(107, mobile_phone="07700 900123"), "phone"),
    (good(108, **{"properties.newsletter": "sometimes"}), "consent"),
    (good(109, score="lots"), "type"),
    (good(110, first_name="Zo\x07ë"), "control_characters"),
    (good(111, **{"properties.notes": "x" * 70_000}), "record_too_large"),
]
DUPLICATES = [good(200, email="first@example.com"), good(200, email="second@example.com")]


@pytest.fixture
def mapping(mappings):
    (mappings / "contacts.csv").write_text(TABLE)
    (mappings / "settings.toml").write_text("[consent]\nauthoritative = true\n[quality]\nmax_invalid_share = 0.5\n")
    return load_contact_mapping(mappings)


def gate(mapping, customers, duplicates=()):
    frame, _, result = prepare_contacts(
        customer_columns([normalise_customer(c) for c in customers], mapping.loyalty_fields), mapping, duplicates)
    return frame, result


def verdict(mapping, result, previous_count=None):
    return batch_verdict(result.checked, result.quarantined, result.non_null, previous_count, mapping.fields,
                         mapping.settings)


def test_each_failure_class_is_quarantined_with_its_reason_and_value(mapping):
    customers = [good(i) for i in range(40)] + [c for c, _ in BAD] + DUPLICATES
    frame, result = gate(mapping, customers)
    caught = {row: {f["check"] for f in fails} for row, fails in result.failures.items()}
    for position, (_, check) in enumerate(BAD, start=40):
        assert caught.get(position) == {check}, (position, check, caught.get(position))
    assert caught[52] == caught[53] == {"id_duplicate"}
    assert result.valid.tolist() == [True] * 40 + [False] * (len(BAD) + 2)
    assert result.checked - result.quarantined == 40 and verdict(mapping, result) == ([], [])
    failure = result.failures[43][0]  # the impossible date, with its value
    assert failure == {"check": "date_format", "field": "date_of_birth", "value": "1990-02-30",
                       "message": "date_of_birth: birth_date = '1990-02-30' is not a YYYY-MM-DD date"}
    assert result.failures[51][0]["value"] > MAX_RECORD_BYTES
    json.dumps(result.failures)  # reasons are plain JSON for the quarantine file and the state store
    assert result.validation["success"] is False and len(result.validation["results"]) > 10


def test_duplicates_across_chunks_are_held_back(mapping):
    _, result = gate(mapping, [good(1), good(2)], duplicates={"c2"})  # c2 also occurs in another chunk
    assert {row: [f["check"] for f in fails] for row, fails in result.failures.items()} == {1: ["id_duplicate"]}


def test_too_many_invalid_customers_block_the_run(mapping, mappings):
    (mappings / "settings.toml").write_text("[consent]\nauthoritative = true\n[quality]\nmax_invalid_share = 0.05\n")
    strict = load_contact_mapping(mappings)
    _, result = gate(strict, [good(i) for i in range(180)] + [good(500 + i, email="broken") for i in range(20)])
    assert verdict(strict, result)[0] == ["20 of 200 customers (10.0%) failed the checks, more than the allowed "
                                          "5.0% (quality.max_invalid_share)"]
    _, small = gate(strict, [good(1), good(50, email="broken")])
    assert verdict(strict, small)[0] == []  # a small increment with one bad customer just quarantines it
    _, fine = gate(strict, [good(i) for i in range(190)] + [good(500 + i, email="broken") for i in range(10)])
    assert verdict(strict, fine)[0] == []  # exactly 5 % is allowed


def test_a_sudden_drop_in_rows_blocks_the_run(mapping):
    _, result = gate(mapping, [good(i) for i in range(30)])
    assert verdict(mapping, result, previous_count=1000)[0] == [
        "30 customers, fewer than 500 (50% of the last full load, 1000)"]
    assert verdict(mapping, result, previous_count=50)[0] == []


def test_a_field_empty_for_everyone_is_a_warning(mapping):
    _, result = gate(mapping, [good(i) for i in range(25)])
    assert verdict(mapping, result)[1] == ["notes (properties.notes) is empty for every customer: is the path right?"]
    assert result.non_null["notes"] == 0 and result.non_null["email"] == 25


def test_the_run_stops_when_great_expectations_and_the_boolean_columns_disagree(mapping, monkeypatch):
    """GX validates the checks in blocks of chunks; a row it fails that the columns passed (or the reverse) stops
    the run instead of being sent or held back on one side's word."""
    from antavo_ometria.sync.contacts import quality

    customers = [good(i) for i in range(10)] + [good(101, email="not-an-email")]
    _, agreed = gate(mapping, customers)
    assert set(agreed.failures) == {10} and agreed.validation["success"] is False
    failing = quality.Check.failing
    monkeypatch.setattr(quality.Check, "failing",
                        lambda rule, checked: failing(rule, checked) & (rule.name != "email_format"))
    with pytest.raises(quality.GateDisagrees, match=r"disagree on email_format \(email\) for rows \[10\]"):
        gate(mapping, customers)


def test_chunks_are_validated_together_with_ids_unique_per_chunk(mapping):
    from antavo_ometria.sync.contacts.quality import GxBlock, check_rows

    frames = [prepare_contacts(customer_columns([normalise_customer(c) for c in part], mapping.loyalty_fields),
                               mapping) for part in ([good(1), good(2)], [good(2), good(3, email="x")])]
    block = GxBlock(mapping)
    for frame, encoded, _ in frames:
        block.add(check_rows(frame, mapping, [len(b) for b in encoded]))
    validation = block.validate()  # c2 in both chunks: unique within each, as each chunk's verdict says
    assert validation["success"] is False and block.rows == 0
    assert sum(r["result"].get("unexpected_count", 0) for r in validation["results"]) == 1
