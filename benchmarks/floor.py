"""A reference floor for the transform: DuckDB reads the staged NDJSON and writes push-ready JSON records.

The same 22 fields of the v2 example mapping, with the same conversions (trimmed text, m/f genders,
YYYY-MM-DD dates, ISO 8601 timestamps in UTC, upper-case countries, E.164 phones, whole numbers,
translated tier names, booleans, lists), built-ins top-level and the rest under `properties`. It checks
nothing and writes empty fields as null: what a compiled engine needs at least, not a replacement.
"""

from __future__ import annotations

from pathlib import Path

TIMESTAMP = "strftime(TRY_CAST({} AS TIMESTAMPTZ) AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S+00:00')"
# the staged customers' types, declared (as a compiled engine would know them) rather than guessed from the data
COLUMNS = {
    "id": "VARCHAR", "email": "VARCHAR", "external_ids": "STRUCT(crm_id VARCHAR)", "first_name": "VARCHAR",
    "last_name": "VARCHAR", "gender": "VARCHAR", "birth_date": "VARCHAR", "country": "VARCHAR",
    "mobile_phone": "VARCHAR", "created_at": "VARCHAR", "language": "VARCHAR", "score": "DOUBLE", "spent": "DOUBLE",
    "tiers": "STRUCT(basic_structure STRUCT(_id VARCHAR, name STRUCT(en VARCHAR, de VARCHAR), since VARCHAR, "
             "next STRUCT(name VARCHAR, points DOUBLE)))",
    "extensions": "STRUCT(expiring_points STRUCT(total DOUBLE))",
    "accounts": "STRUCT(prestige_balance STRUCT(earned DOUBLE))",
    "properties": "STRUCT(city VARCHAR, newsletter BOOLEAN)", "labels": "VARCHAR[]",
}

QUERY = f"""
COPY (
  SELECT UNNEST({{
    '@type': 'contact', '@collection': 'antavo', '@merge': true,
    'id': id,
    'email': trim(email),
    'customer_id': trim(external_ids.crm_id),
    'firstname': trim(first_name),
    'lastname': trim(last_name),
    'gender': CASE lower(trim(gender)) WHEN 'male' THEN 'm' WHEN 'm' THEN 'm'
                                       WHEN 'female' THEN 'f' WHEN 'f' THEN 'f' END,
    'date_of_birth': strftime(TRY_CAST(birth_date AS DATE), '%Y-%m-%d'),
    'country_id': upper(trim(country)),
    'phone_number': regexp_replace(regexp_replace(mobile_phone, '[\\s\\-().]', '', 'g'), '^00', '+'),
    'timestamp_acquired': {TIMESTAMP.format("created_at")},
    'language': trim(language),
    'properties': {{
      'loyalty_points': TRY_CAST(score AS BIGINT),
      'loyalty_points_spent': TRY_CAST(spent AS BIGINT),
      'loyalty_tier_id': trim(tiers.basic_structure._id),
      'loyalty_tier': trim(tiers.basic_structure.name.en),
      'tier_since': {TIMESTAMP.format("tiers.basic_structure.since")},
      'next_tier': trim(tiers.basic_structure.next.name),
      'points_to_next_tier': TRY_CAST(tiers.basic_structure.next.points AS BIGINT),
      'expiring_points': TRY_CAST(extensions.expiring_points.total AS BIGINT),
      'prestige_earned': TRY_CAST(accounts.prestige_balance.earned AS BIGINT),
      'city': trim(properties.city),
      'newsletter': properties.newsletter,
      'labels': labels
    }}
  }})
  FROM read_json('{{source}}', format = 'newline_delimited', columns = {{columns}}, ignore_errors = true)
) TO '{{target}}' (FORMAT json)
"""


def transform_file(source: Path, target: Path, threads: int = 2) -> int:
    """The staged customers in `source` → one JSON contact per line in `target`; returns the records written."""
    import duckdb

    with duckdb.connect(config={"threads": threads}) as db:
        db.execute("SET enable_progress_bar = false")
        db.execute(QUERY.replace("{source}", str(source)).replace("{target}", str(target))
                   .replace("{columns}", "{" + ", ".join(f"'{k}': '{v}'" for k, v in COLUMNS.items()) + "}"))
    with target.open("rb") as written:
        return sum(1 for _ in written)
