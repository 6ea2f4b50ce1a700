"""Event trigger rules (`include/mappings/triggers.csv`) and the Ometria custom events they produce.

One row per payload property of a rule:

    rule,antavo_action,ometria_event_type,property,source
    reward_claimed,reward,loyalty_reward_claimed,reward_name,reward.title

`source` is `event.<property>` (the Antavo event's own properties, plus `event.points`),
`reward.<field>` (the claimed reward: title, description, type, points) or `customer.<path>` (any
loyalty field of the customer, as in the contact mapping). Ometria needs the custom event type set
up by its team first, and keeps the type under 32 characters.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from antavo_ometria.ometria.contract import (
    MAX_EVENT_TYPE,
    MAX_EXACT_NUMBER,
    MAX_STRING_PROPERTY,
    STAGGER_AT,
    STAGGER_STEP,
)
from antavo_ometria.problems import ConfigError, Problem
from antavo_ometria.sync.tables.csv_files import did_you_mean, read_csv, rows_of
from antavo_ometria.values import is_translation, translated, walk

TRIGGERS_FILE = "triggers.csv"
COLUMNS = ("rule", "antavo_action", "ometria_event_type", "property", "source")
REWARD_FIELDS = ("id", "title", "description", "type", "points")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    event_type: str
    properties: tuple[tuple[str, str], ...]  # (property, source)

    @property
    def customer_paths(self) -> list[str]:
        return [source.split(".", 1)[1] for _, source in self.properties if source.startswith("customer.")]

    @property
    def needs_rewards(self) -> bool:
        return any(source.startswith("reward.") for _, source in self.properties)


def rule_actions(mappings_dir: Path) -> dict[str, str]:
    """Rule name → Antavo action, read leniently: cheap enough for DAG parsing; `load_rules` checks the file."""
    try:
        text = (mappings_dir / TRIGGERS_FILE).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return {}
    rows = csv.DictReader(io.StringIO(text))
    return {row["rule"].strip(): (row.get("antavo_action") or "").strip()
            for row in rows if NAME.match((row.get("rule") or "").strip())}


def load_rules(mappings_dir: Path) -> list[Rule]:
    """Read and check the trigger table; raise ConfigError listing every problem."""
    path = mappings_dir / TRIGGERS_FILE
    file = str(path)
    if not path.exists():
        return []
    header, lines, problems = read_csv(path)
    if header != list(COLUMNS):
        raise ConfigError(problems + [Problem(file, 1, "", f"the header must be {','.join(COLUMNS)}")])
    rows: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for line, cells in rows_of(file, list(COLUMNS), lines, problems):
        problems += _check_row(file, line, cells)
        rows[cells["rule"]].append((line, cells))
    rules = []
    for name, entries in rows.items():
        problems += _check_rule(file, name, entries)
        first = entries[0][1]
        rules.append(Rule(name, first["antavo_action"], first["ometria_event_type"],
                          tuple((c["property"], c["source"]) for _, c in entries)))
    if problems:
        raise ConfigError(problems)
    return rules


def _check_row(file: str, line: int, cells: dict) -> list[Problem]:
    """The problems of one row on its own: empty cells, names, the event type's length, the source."""
    problems = [Problem(file, line, column, f"{column} is empty; fill it in or delete the row")
                for column in COLUMNS if not cells[column]]
    if cells["rule"] and not NAME.match(cells["rule"]):
        problems.append(Problem(file, line, "rule", "rule names use lower-case letters, digits and _"))
    if len(cells["ometria_event_type"]) > MAX_EVENT_TYPE:
        problems.append(Problem(file, line, "ometria_event_type", f"Ometria event types must be under {MAX_EVENT_TYPE + 1} "
                                f"characters; {cells['ometria_event_type']!r} has {len(cells['ometria_event_type'])}"))
    if cells["property"] and not re.match(r"^[A-Za-z0-9_]+$", cells["property"]):
        problems.append(Problem(file, line, "property", "property names use letters, digits and _ (they become "
                                "merge tags such as {{ event.reward_name }})"))
    return problems + _check_source(file, line, cells["source"])


def _check_rule(file: str, name: str, entries: list[tuple[int, dict]]) -> list[Problem]:
    """The problems across a rule's rows: they agree on action and event type, and set each property once."""
    problems = []
    first_line, first = entries[0]
    for line, cells in entries[1:]:
        for column in ("antavo_action", "ometria_event_type"):
            if cells[column] != first[column]:
                problems.append(Problem(file, line, column, f"rule {name!r} has {column} {first[column]!r} on "
                                        f"line {first_line}; every row of a rule must agree"))
    seen: dict[str, int] = {}
    for line, cells in entries:
        if cells["property"] in seen:
            problems.append(Problem(file, line, "property", f"{cells['property']!r} is already set on line "
                                    f"{seen[cells['property']]}"))
        seen[cells["property"]] = line
    return problems


def _check_source(file: str, line: int, source: str) -> list[Problem]:
    from antavo_ometria.sync.tables.mapping import (  # not at import: DAG parsing reads rule_actions
        catalog,
        find_in_catalog,
    )

    kind, _, rest = source.partition(".")
    if not source:
        return []
    if kind == "event" and rest:
        return []
    if kind == "reward" and rest in REWARD_FIELDS:
        return []
    if kind == "customer" and rest:
        if find_in_catalog(rest):
            return []

        hint = did_you_mean(rest, [f.path for f in catalog()])
        return [Problem(file, line, "source", f"unknown customer field {rest!r}{hint}")]
    if kind == "reward":
        return [Problem(file, line, "source", f"reward fields are {', '.join(REWARD_FIELDS)}, not {rest!r}")]
    return [Problem(file, line, "source", f"{source!r} must start with event., reward. or customer.")]


# -- building the custom events ----------------------------------------------------------------
def resolve(source: str, event: dict, reward: dict | None, customer: dict | None, language: str) -> object:
    kind, _, rest = source.partition(".")
    if kind == "event":
        value = event.get(rest) if rest in ("points", "action", "id") else walk(event.get("properties", {}), rest)
    elif kind == "reward":
        value = (reward or {}).get(rest)
    else:
        value = walk(customer or {}, rest)
    if is_translation(value):
        value = translated(value, language)
    if isinstance(value, str) and len(value) > MAX_STRING_PROPERTY:
        value = value[:MAX_STRING_PROPERTY]
    return value


def ometria_event_id(rule: str, antavo_event_id: str) -> str:
    """The Ometria custom event id of one rule's event: `<rule>:<Antavo event id>`.

    Deterministic, so pushing it again cannot duplicate it; per rule, so that two rules on one Antavo action
    each deliver their own event instead of the second overwriting (or being skipped for) the first."""
    return f"{rule}:{antavo_event_id}"


def custom_event(rule: Rule, event: dict, customer: dict, reward: dict | None, identity: dict,
                 language: str, timestamp: datetime) -> dict:
    """One Ometria custom event, with the rule's own id for the Antavo event (`ometria_event_id`)."""
    record = {"@type": "custom_event", "id": ometria_event_id(rule.name, event["id"]), "event_type": rule.event_type,
              "timestamp": timestamp.isoformat(timespec="seconds"), **identity}
    properties = {}
    for name, source in rule.properties:
        value = resolve(source, event, reward, customer, language)
        if value is not None:
            properties[name] = value
    record["properties"] = properties
    return record


def unsendable(record: dict) -> list[str]:
    """Why a custom event cannot be sent as it is: properties that are no finite number JSON carries exactly."""
    problems = []
    for name, value in record["properties"].items():
        if isinstance(value, float) and not math.isfinite(value) or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_EXACT_NUMBER):
            problems.append(f"property {name} = {value!r} is not a number Ometria can take (finite, up to ±2^53)")
    return problems


def stagger(timestamps: list[datetime], already: dict[datetime, int] | None = None) -> list[datetime]:
    """Spread events sharing one timestamp in steps of 5 minutes, never more than 1,000 on a timestamp sent
    (Ometria's advice), counting those moved onto a later second with that second's own events.

    A timestamp is the whole second the custom event carries (Antavo's have milliseconds, Ometria's are written to
    the second); `already` counts the events earlier deliveries sent with each timestamp, so a burst split across
    deliveries continues where the last one stopped instead of starting again at zero."""
    taken: dict[datetime, int] = defaultdict(int, already or {})
    out = []
    for moment in timestamps:
        slot = whole_second(moment)
        while taken[slot] >= STAGGER_AT:
            slot += STAGGER_STEP
        taken[slot] += 1
        out.append(slot)
    return out


def whole_second(moment: datetime) -> datetime:
    """The second a custom event's timestamp is written to (see `custom_event`)."""
    return moment.replace(microsecond=0)
