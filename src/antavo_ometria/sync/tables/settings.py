"""Sync settings: the part of the configuration that is not a field mapping (`settings.toml`).

Each setting is declared once, as a field of SyncSettings: its section and key in the file, its type, its
default, the rule its value keeps (with the message that names it), whether it shapes the payloads (and so
the mapping version), and its line in the README. Reading the file, the mapping version's inputs and the
README's settings table (`settings_table`, compared with the README by a test) all come from there.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from antavo_ometria.problems import ConfigError, Problem

PAYLOAD_MODES = ("legacy", "v2")
LATE_EVENT_POLICIES = ("send", "skip")
# how the sync treats marketing consent (Ometria's rule: without a forced listing, any opt-out wins)
CONSENT_MODES = ("never", "preference", "authoritative")

Check = tuple[Callable[[Any], bool], str]  # (is the value acceptable, the rule it breaks)


def _share(name: str) -> Check:
    return (lambda v: 0 <= v <= 1, f"{name} must be between 0 and 1")


def _one_of(name: str, allowed: tuple[str, ...]) -> Check:
    return (lambda v: v in allowed, f"{name} must be one of {allowed}")


def _consent_in_its_first_form(mode: str) -> dict[str, bool]:
    """The consent mode as mapping versions were first written with it, so an upgrade does not re-send everyone."""
    form = {"consent_authoritative": mode != "never"}
    if mode == "authoritative":
        form["force_optin"] = True
    return form


def _setting(section: str, key: str, default: Any, types: type | tuple[type, ...], doc: str, **declared: Any) -> Any:
    """A SyncSettings field that carries its declaration; `declared` takes the optional fields of Setting."""
    return field(default=default, metadata={"setting": {"section": section, "key": key, "types": types, "doc": doc,
                                                        **declared}})


@dataclass(frozen=True)
class SyncSettings:
    """The settings a run reads, each field declared with `_setting`: section, key, default, type, README line,
    and the optional parts of Setting (its rule, whether it shapes the payloads, how it is read and hashed)."""

    collection: str = _setting(
        "ometria", "collection", "antavo", str, "Ometria collection the contacts are written to",
        check=(lambda v: bool(v.strip()), "collection must not be empty"), shapes_payload=True)
    # the Ometria list (segment) the contacts join through `@add_to_lists`; TOML lets it be written as a number
    list_id: str = _setting(
        "ometria", "list_id", "", (str, int),
        "Ometria list the contacts join (`@add_to_lists`); the shipped file uses `8400`",
        check=(lambda v: v == "" or v.isdigit(),
               "list_id must be the numeric ID of an Ometria list (`make check` names the account's lists), or empty"),
        read_as=str, shapes_payload=True)
    payload_mode: str = _setting(
        "ometria", "payload_mode", "legacy", str,
        "`legacy`: every field flat; `v2`: built-ins top-level, custom fields under `properties`",
        check=_one_of("payload_mode", PAYLOAD_MODES), shapes_payload=True)
    # "never": consent is not sent; "preference": marketing_optin and SMS preferences are sent as mapped;
    # "authoritative": the same, and a contact's marketing_optin is forced (`@force_optin`)
    consent_mode: str = _setting(
        "consent", "mode", "never", str,
        "`never`, `preference` or `authoritative` (forced with `@force_optin`): see [Consent](#consent)",
        check=_one_of("consent mode", CONSENT_MODES), shapes_payload=True, hashed_as=_consent_in_its_first_form)
    language: str = _setting(
        "translations", "language", "en", str, 'language picked from translated names (`{"en": "Gold"}`)',
        shapes_payload=True)
    customer_status: str = _setting("antavo", "customer_status", "active", str, "which customers a full load reads")
    max_invalid_share: float = _setting(
        "quality", "max_invalid_share", 0.05, (int, float),
        "more quarantined than this share stops the run before sending", check=_share("max_invalid_share"))
    min_rows_vs_last_run: float = _setting(
        "quality", "min_rows_vs_last_run", 0.5, (int, float),
        "a full load smaller than this share of the last one stops the run", check=_share("min_rows_vs_last_run"))
    overlap_minutes: int = _setting(
        "sync", "overlap_minutes", 10, int, "incremental runs re-read this many minutes before their interval",
        check=(lambda v: v >= 0, "overlap_minutes must not be negative"))
    max_rejected_share: float = _setting(
        "quality", "max_rejected_share", 0.05, (int, float),
        "Ometria rejecting more than this share of a run's new contacts fails the load",
        check=_share("max_rejected_share"))
    max_leaver_share: float = _setting(
        "quality", "max_leaver_share", 0.05, (int, float),
        "more members than this share leaving the list in one run stops it, removing nobody",
        check=_share("max_leaver_share"))
    retry_first_hours: float = _setting(
        "sync", "retry_first_hours", 1.0, (int, float),
        "an owed contact is tried by the next run, then after this wait, doubling each time",
        check=(lambda v: v > 0, "retry_first_hours must be more than 0"))
    retry_max_hours: float = _setting(
        "sync", "retry_max_hours", 24.0, (int, float), "the longest wait between two tries of an owed contact",
        check=(lambda v: v > 0, "retry_max_hours must be more than 0"))
    max_contacts_per_run: int = _setting(
        "sync", "max_contacts_per_run", 0, int,
        "a run sends at most this many contacts (owed ones first); the rest stay owed, `deferred` in the report, "
        "and the next runs send them; `0`: no cap",
        check=(lambda v: v >= 0, "max_contacts_per_run must not be negative (0: no cap)"))
    reconcile_every_hours: float = _setting(
        "sync", "reconcile_every_hours", 24.0, (int, float),
        "a run reads every customer and sends what differs from what Ometria accepted; `0`: on request only",
        check=(lambda v: v >= 0, "reconcile_every_hours must not be negative (0: only on request)"))
    late_event_policy: str = _setting(
        "events", "late_event_policy", "send", str,
        "events older than 4 hours cannot start an automation: `send` (and warn) or `skip`",
        check=_one_of("late_event_policy", LATE_EVENT_POLICIES))
    event_poll_seconds: float = _setting(
        "events", "poll_seconds", 5.0, (int, float),
        "seconds between the events DAG's reads of Antavo's event feed; a read is one page per 100 events (of any "
        "action) since a minute before the rules' cursors, about 15 minutes at most: 720 requests an hour at 5 while "
        "fewer than 100 events fall in that span (Antavo allows 1,500 a minute); the claim → Ometria latency it "
        "gives is in BENCHMARKS.md",
        check=(lambda v: v >= 1, "poll_seconds must be at least 1 (Antavo's rate limit is shared by every call)"))

    @classmethod
    def of(cls, values: dict) -> SyncSettings:
        """The settings a run's plan carries (`asdict`); a setting added since the plan was made takes its default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def v2(self) -> bool:
        return self.payload_mode == "v2"

    @property
    def sends_consent(self) -> bool:
        return self.consent_mode != "never"

    @property
    def force_optin(self) -> bool:
        return self.consent_mode == "authoritative"


@dataclass(frozen=True)
class Setting:
    """One setting of `settings.toml`, as declared on its SyncSettings field."""

    attribute: str
    default: Any
    section: str
    key: str
    types: type | tuple[type, ...]
    doc: str  # its line in the README's settings table
    check: Check | None = None
    shapes_payload: bool = False  # part of the mapping version: changing it re-sends every contact
    read_as: Callable[[Any], Any] | None = None  # turns a value of one of `types` into the attribute's type
    hashed_as: Callable[[Any], dict] | None = None  # its form in the mapping version, when not {attribute: value}

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    def has_type(self, value: Any) -> bool:
        # TOML's true is a Python int: a whole-number setting refuses it
        return isinstance(value, self.types) and not (self.types is int and isinstance(value, bool))

    def read(self, value: Any) -> Any:
        return self.read_as(value) if self.read_as else value

    def broken_rule(self, value: Any) -> str | None:
        """The message for a value that breaks the setting's rule, or None."""
        if self.check is None or self.check[0](value):
            return None
        return f"{self.check[1]}, not {value!r}"

    def version_inputs(self, value: Any) -> dict:
        return self.hashed_as(value) if self.hashed_as else {self.attribute: value}

    @property
    def shown_default(self) -> str:
        if self.default == "":
            return '""'
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


SETTINGS: tuple[Setting, ...] = tuple(Setting(f.name, f.default, **f.metadata["setting"]) for f in fields(SyncSettings))
_BY_KEY = {(s.section, s.key): s for s in SETTINGS}
_BY_ATTRIBUTE = {s.attribute: s for s in SETTINGS}
_SECTIONS = sorted({s.section for s in SETTINGS})


def settings_table() -> str:
    """The README's table of settings, written from the declarations."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.name}` | `{s.shown_default}` | {s.doc} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class SettingsRead:
    """What `settings.toml` says: the settings (a value that failed its check is left at its default), the
    problems, and which settings failed, so that nothing is judged against a default nobody chose."""

    settings: SyncSettings
    problems: tuple[Problem, ...] = ()
    failed: frozenset[str] = frozenset()  # SyncSettings attributes whose value was wrong; "*": all, unreadable
    warnings: tuple[Problem, ...] = ()


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
    parsed = _parse(file, raw)
    if isinstance(parsed, Problem):
        return SettingsRead(SyncSettings(), (parsed,), frozenset({"*"}))
    lines, data = parsed
    consent, warnings = _earlier_consent_form(file, lines, data)
    values, problems, failed = _typed_values(file, lines, data)
    if consent:
        failed.add("consent_mode")
        values.pop("consent_mode", None)
    kept, broken = _keeping_their_rules(file, lines, values)
    failed.update(set(values) - set(kept))
    return SettingsRead(SyncSettings(**kept), (*problems, *consent, *broken), frozenset(failed), tuple(warnings))


def _parse(file: str, raw: bytes) -> tuple[list[str], dict] | Problem:
    """The file's lines and its TOML, or the problem that makes it unreadable."""
    try:
        text = raw.decode("utf-8")
        return text.splitlines(), tomllib.loads(text)
    except UnicodeDecodeError:
        return Problem(file, 1, "", "the file is not UTF-8; save it as UTF-8")
    except tomllib.TOMLDecodeError as exc:
        return Problem(file, getattr(exc, "lineno", 0) or 0, "", f"not valid TOML: {exc}")


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
    for section, key, value in _entries(file, lines, data, problems):
        setting = _BY_KEY.get((section, key))
        line = _line_of(lines, key)
        if setting is None:
            known = sorted(s.key for s in SETTINGS if s.section == section)
            problems.append(Problem(file, line, key, f"unknown setting {section}.{key}; known: {', '.join(known)}"))
        elif not setting.has_type(value):
            problems.append(Problem(file, line, key, f"{setting.name} has the wrong type ({value!r})"))
            failed.add(setting.attribute)
        else:
            values[setting.attribute] = setting.read(value)
    return values, problems, failed


def _entries(file: str, lines: list[str], data: dict, problems: list[Problem]) -> Iterator[tuple[str, str, Any]]:
    """(section, key, value) of each entry in a known section; an unknown section is added to `problems` as it
    comes, so that the problems stay in the file's order."""
    for section, table in data.items():
        if section in _SECTIONS and isinstance(table, dict):
            yield from ((section, key, value) for key, value in table.items())
        else:
            problems.append(Problem(file, _line_of(lines, f"[{section}]"), section,
                                    f"unknown section [{section}]; known: {', '.join(_SECTIONS)}"))


def _keeping_their_rules(file: str, lines: list[str], values: dict) -> tuple[dict, list[Problem]]:
    """The values that keep their setting's rule, and a problem for each one that breaks it."""
    kept: dict = {}
    problems: list[Problem] = []
    for attribute, value in values.items():
        setting = _BY_ATTRIBUTE[attribute]
        broken = setting.broken_rule(value)
        if broken is None:
            kept[attribute] = value
        else:
            problems.append(Problem(file, _line_of(lines, setting.key), setting.key, broken))
    return kept, problems


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
