"""Sync settings: the part of the configuration that is not a field mapping (`settings.toml`)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from antavo_ometria.problems import ConfigError, Problem

PAYLOAD_MODES = ("legacy", "v2")
LATE_EVENT_POLICIES = ("send", "skip")
# how the sync treats marketing consent (Ometria's rule: without a forced listing, any opt-out wins)
CONSENT_MODES = ("never", "preference", "authoritative")


@dataclass(frozen=True)
class SyncSettings:
    collection: str = "antavo"
    list_id: str = ""  # Ometria list (segment) the contacts join through `@add_to_lists`
    payload_mode: str = "legacy"
    # "never": consent is not sent; "preference": marketing_optin and SMS preferences are sent as mapped;
    # "authoritative": the same, and a contact's marketing_optin is forced (`@force_optin`)
    consent_mode: str = "never"
    language: str = "en"  # for translated names such as {"en": "Gold"}
    customer_status: str = "active"  # which Antavo customers a full load reads
    max_invalid_share: float = 0.05  # quarantine more than this share and the run stops
    min_rows_vs_last_run: float = 0.5  # fewer rows than this share of the last run stops it
    overlap_minutes: int = 10  # incremental runs look back this far before the interval
    late_event_policy: str = "send"
    max_rejected_share: float = 0.05  # Ometria rejects more than this share of a run's contacts: the load fails
    max_leaver_share: float = 0.05  # more members than this share would leave the list in one run: nothing is removed
    retry_first_hours: float = 1.0  # an owed contact is tried by the next run, then after this wait, doubling
    retry_max_hours: float = 24.0  # … up to this wait
    max_contacts_per_run: int = 0  # a run sends at most this many contacts, the rest stay owed for the next; 0: all
    reconcile_every_hours: float = 24.0  # every customer is read and compared with what Ometria accepted; 0: never

    @property
    def v2(self) -> bool:
        return self.payload_mode == "v2"

    @property
    def sends_consent(self) -> bool:
        return self.consent_mode != "never"

    @property
    def force_optin(self) -> bool:
        return self.consent_mode == "authoritative"


_FIELDS = {
    # key in the file: (section, attribute, type)
    ("ometria", "collection"): ("collection", str),
    ("ometria", "list_id"): ("list_id", (str, int)),
    ("ometria", "payload_mode"): ("payload_mode", str),
    ("consent", "mode"): ("consent_mode", str),
    ("translations", "language"): ("language", str),
    ("antavo", "customer_status"): ("customer_status", str),
    ("quality", "max_invalid_share"): ("max_invalid_share", (int, float)),
    ("quality", "min_rows_vs_last_run"): ("min_rows_vs_last_run", (int, float)),
    ("sync", "overlap_minutes"): ("overlap_minutes", int),
    ("events", "late_event_policy"): ("late_event_policy", str),
    ("quality", "max_rejected_share"): ("max_rejected_share", (int, float)),
    ("quality", "max_leaver_share"): ("max_leaver_share", (int, float)),
    ("sync", "retry_first_hours"): ("retry_first_hours", (int, float)),
    ("sync", "retry_max_hours"): ("retry_max_hours", (int, float)),
    ("sync", "reconcile_every_hours"): ("reconcile_every_hours", (int, float)),
    ("sync", "max_contacts_per_run"): ("max_contacts_per_run", int),
}


@dataclass(frozen=True)
class SettingsRead:
    """What `settings.toml` says: the settings (a value that failed its check is left at its default), the
    problems, and which settings failed, so that nothing is judged against a default nobody chose."""

    settings: SyncSettings
    problems: tuple[Problem, ...] = ()
    failed: frozenset[str] = frozenset()  # SyncSettings attributes whose value was wrong; "*": all, unreadable
    warnings: tuple[Problem, ...] = ()


_CHECKS = {
    # attribute: (is the value acceptable, the rule it breaks)
    "payload_mode": (lambda v: v in PAYLOAD_MODES, f"payload_mode must be one of {PAYLOAD_MODES}"),
    "late_event_policy": (lambda v: v in LATE_EVENT_POLICIES, f"late_event_policy must be one of {LATE_EVENT_POLICIES}"),
    "consent_mode": (lambda v: v in CONSENT_MODES, f"consent mode must be one of {CONSENT_MODES}"),
    "collection": (lambda v: bool(v.strip()), "collection must not be empty"),
    "list_id": (lambda v: v == "" or v.isdigit(),
                "list_id must be the numeric ID of an Ometria list (`make check` names the account's lists), or empty"),
    "max_invalid_share": (lambda v: 0 <= v <= 1, "max_invalid_share must be between 0 and 1"),
    "min_rows_vs_last_run": (lambda v: 0 <= v <= 1, "min_rows_vs_last_run must be between 0 and 1"),
    "overlap_minutes": (lambda v: v >= 0, "overlap_minutes must not be negative"),
    "max_rejected_share": (lambda v: 0 <= v <= 1, "max_rejected_share must be between 0 and 1"),
    "max_leaver_share": (lambda v: 0 <= v <= 1, "max_leaver_share must be between 0 and 1"),
    "retry_first_hours": (lambda v: v > 0, "retry_first_hours must be more than 0"),
    "retry_max_hours": (lambda v: v > 0, "retry_max_hours must be more than 0"),
    "reconcile_every_hours": (lambda v: v >= 0, "reconcile_every_hours must not be negative (0: only on request)"),
    "max_contacts_per_run": (lambda v: v >= 0, "max_contacts_per_run must not be negative (0: no cap)"),
}


def load_settings(path: Path) -> SyncSettings:
    """Read `settings.toml`; every problem is reported at once as a ConfigError."""
    read = read_settings(path)
    if read.problems:
        raise ConfigError(list(read.problems))
    return read.settings


def read_settings(path: Path) -> SettingsRead:
    """Read `settings.toml` without raising: every problem, and the settings that are right."""
    file = str(path)
    try:
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # an editor's byte-order mark
    except FileNotFoundError:
        return SettingsRead(SyncSettings())
    unreadable = frozenset({"*"})
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        return SettingsRead(SyncSettings(), (Problem(file, 1, "", "the file is not UTF-8; save it as UTF-8"),),
                            unreadable)
    except tomllib.TOMLDecodeError as exc:
        problem = Problem(file, getattr(exc, "lineno", 0) or 0, "", f"not valid TOML: {exc}")
        return SettingsRead(SyncSettings(), (problem,), unreadable)
    lines = text.splitlines()
    consent, warnings = _earlier_consent_form(file, lines, data)
    values, problems, failed = _typed_values(file, lines, data)
    problems += consent
    if consent:
        failed.add("consent_mode")
        values.pop("consent_mode", None)
    for attribute, value in list(values.items()):
        accepted, message = _CHECKS.get(attribute, (lambda v: True, ""))
        if not accepted(value):
            key = next(k for (_, k), (a, _) in _FIELDS.items() if a == attribute)
            problems.append(Problem(file, _line_of(lines, key), key, f"{message}, not {value!r}"))
            del values[attribute]
            failed.add(attribute)
    return SettingsRead(SyncSettings(**values), tuple(problems), frozenset(failed), tuple(warnings))


def _earlier_consent_form(file: str, lines: list[str], data: dict) -> tuple[list[Problem], list[Problem]]:
    """`[consent] authoritative = true/false`, the earlier form of `mode`, is read as the mode it always meant
    (true sent marketing_optin without forcing it): (problems, warnings). Rewrites `data` in place."""
    table = data.get("consent")
    if not isinstance(table, dict) or "authoritative" not in table:
        return [], []
    line = _line_of(lines, "authoritative")
    value = table.pop("authoritative")
    if "mode" in table:
        return [Problem(file, line, "authoritative", "set either [consent] mode or the earlier authoritative, "
                        "not both; keep mode")], []
    if not isinstance(value, bool):
        return [Problem(file, line, "authoritative", f"consent.authoritative has the wrong type ({value!r}); "
                        f"write mode = one of {CONSENT_MODES} instead")], []
    mode = "preference" if value else "never"
    table["mode"] = mode
    return [], [Problem(file, line, "authoritative", f"authoritative = {str(value).lower()} is read as "
                        f'mode = "{mode}"; write that instead (mode = "authoritative" also forces Antavo\'s '
                        "marketing_optin over opt-outs from other sources)")]


def _typed_values(file: str, lines: list[str], data: dict) -> tuple[dict, list[Problem], set[str]]:
    """{attribute: value} of the settings of the right type, the problems, and the attributes of the wrong type."""
    problems: list[Problem] = []
    values: dict = {}
    failed: set[str] = set()
    known_sections = {section for section, _ in _FIELDS}
    for section, table in data.items():
        if section not in known_sections or not isinstance(table, dict):
            problems.append(Problem(file, _line_of(lines, f"[{section}]"), section,
                                    f"unknown section [{section}]; known: {', '.join(sorted(known_sections))}"))
            continue
        for key, value in table.items():
            spec = _FIELDS.get((section, key))
            line = _line_of(lines, key)
            if spec is None:
                known = sorted(k for s, k in _FIELDS if s == section)
                problems.append(Problem(file, line, key, f"unknown setting {section}.{key}; known: {', '.join(known)}"))
                continue
            attribute, kind = spec
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                problems.append(Problem(file, line, key, f"{section}.{key} has the wrong type ({value!r})"))
                failed.add(attribute)
                continue
            values[attribute] = str(value) if attribute == "list_id" else value
    return values, problems, failed


def _line_of(lines: list[str], needle: str) -> int:
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith(needle) and (needle.startswith("[") or stripped[len(needle):].lstrip().startswith("=")):
            return number
    return 0


def mappings_dir() -> Path:
    """Where the analyst-edited files live: $ANTAVO_OMETRIA_MAPPINGS_DIR; else `include/mappings` beside the DAGs
    folder (the Airflow project layout: dags/, include/, plugins/); else the source checkout's."""
    if os.environ.get("ANTAVO_OMETRIA_MAPPINGS_DIR"):
        return Path(os.environ["ANTAVO_OMETRIA_MAPPINGS_DIR"])
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    beside = Path(os.environ.get("AIRFLOW__CORE__DAGS_FOLDER") or home / "dags").parent / "include" / "mappings"
    return beside if beside.is_dir() else Path(__file__).resolve().parents[3] / "include" / "mappings"
