"""The contact mapping table: Antavo loyalty fields → Ometria remote fields.

`include/mappings/contacts.csv` has one mapping per row:

    loyalty_field,remote_field,format,overwrite_empty
    email,email,,
    tiers.basic_structure.name,loyalty_tier,,

`loyalty_field` is a dot path into the Antavo customer (see the catalog, `data/loyalty_fields.csv`),
`remote_field` an Ometria built-in contact field (`data/ometria_contact_fields.csv`) or the ID of a
custom field created in Ometria. `format` (optional) sets how a custom field's value is written;
`overwrite_empty` (optional, `yes`/`no`, default `no`) lets an empty Antavo value clear Ometria's.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from antavo_ometria.ometria.contract import CUSTOM_FIELD_ID
from antavo_ometria.ometria.formats import CUSTOM_FORMATS, FORMATS
from antavo_ometria.ometria.payload import ContactShape
from antavo_ometria.problems import ConfigError, Problem
from antavo_ometria.sync.tables.csv_files import did_you_mean, read_csv, rows_of
from antavo_ometria.sync.tables.settings import SETTINGS, SyncSettings, read_settings

CONTACTS_FILE = "contacts.csv"
SETTINGS_FILE = "settings.toml"
COLUMNS = ("loyalty_field", "remote_field", "format", "overwrite_empty")
REQUIRED_COLUMNS = ("loyalty_field", "remote_field")
CUSTOMER = "customer."  # loyalty fields may be written as Antavo's module does: customer.tiers.*


@dataclass(frozen=True)
class CatalogField:
    path: str
    format: str
    modes: tuple[str, ...]
    module: str
    description: str

    def matches(self, path: str) -> bool:
        want, have = self.path.split("."), path.split(".")
        return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have))


@dataclass(frozen=True)
class FieldMapping:
    loyalty_field: str
    remote_field: str
    format: str
    overwrite_empty: bool
    builtin: bool
    line: int


@dataclass(frozen=True)
class ContactMapping:
    fields: tuple[FieldMapping, ...]
    settings: SyncSettings
    version: str  # changes whenever what the mapping table or the settings say changes
    warnings: tuple[Problem, ...] = ()  # worth a look, but nothing is wrong enough to stop
    same_as: tuple[str, ...] = ()  # earlier forms of this version (see file_version)

    def is_version(self, version: str) -> bool:
        return version == self.version or version in self.same_as or SHIPPED_EARLIER.get(version) == self.version

    @property
    def shape(self) -> ContactShape:
        return ContactShape(self.settings.collection, self.settings.list_id, self.settings.v2, self.fields,
                            self.settings.force_optin)

    @property
    def loyalty_fields(self) -> list[str]:
        return sorted({f.loyalty_field for f in self.fields})


def _data_csv(name: str) -> list[dict]:
    text = resources.files("antavo_ometria").joinpath("data", name).read_text("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@cache
def catalog() -> tuple[CatalogField, ...]:
    """Selectable Antavo loyalty fields; `*` stands for a tier-structure, account or property ID."""
    return tuple(
        CatalogField(r["path"], r["format"], tuple(r["modes"].split()), r["module"], r["description"])
        for r in _data_csv("loyalty_fields.csv")
    )


@cache
def builtin_fields() -> dict[str, str]:
    """Ometria's built-in contact fields and the format each one takes."""
    return {r["field"]: r["format"] for r in _data_csv("ometria_contact_fields.csv")}


def find_in_catalog(path: str) -> CatalogField | None:
    return next((f for f in catalog() if f.matches(path)), None)


# loyalty field prefixes under which Antavo documents more than the catalog offers, and why it does not
NOT_OFFERED = {
    "extensions.expiring_points.": (
        "only extensions.expiring_points.total is offered for expiring points: it is the one field Antavo's "
        "Ometria module names. Antavo documents GET /customers/{id}?fields=expiring_points only as \"a summary "
        "of expiration statistics\", without naming the fields in it, and fields=expiring_points.history as a "
        "list of dates and points, not one value that a contact field can hold"),
}


def not_offered(path: str) -> str | None:
    """Why a loyalty field under a documented module is not in the catalog, or None."""
    return next((why for prefix, why in NOT_OFFERED.items() if path.startswith(prefix)), None)


PAYLOAD_SETTINGS = tuple(s.attribute for s in SETTINGS if s.shapes_payload)
CONSENT_FIELDS = ("marketing_optin", "channels.sms.allow_marketing", "channels.sms.allow_transactional")


def mapping_version(fields: list[FieldMapping], settings: SyncSettings) -> str:
    """A short hash of what shapes the payloads (the rows, and the settings declared to shape them), not of the
    files' bytes: line endings, a byte-order mark, comments, the order of rows or a quality threshold do not
    change it, so they do not re-send every contact."""
    rows = sorted((f.loyalty_field, f.remote_field, f.format, f.overwrite_empty) for f in fields)
    shaping: dict = {}
    for setting in SETTINGS:
        if setting.shapes_payload:
            shaping.update(setting.version_inputs(getattr(settings, setting.attribute)))
    return hashlib.sha256(json.dumps([rows, shaping], sort_keys=True).encode()).hexdigest()[:12]


# the file versions of the mapping tables shipped before the settings file was reworded, and the content
# versions they mean: a run recorded under them counts as the same mapping after an upgrade
SHIPPED_EARLIER = {"7ea83d3e5a85": "318be70fe8af", "02dccf43a8ca": "5aa90cfbfab6"}


def file_version(contacts_file: Path, settings_file: Path) -> str:
    """The version's earlier form, a hash of the files' bytes: a run recorded under it with the same files
    counts as the same mapping, so an upgrade does not re-send every contact."""
    digest = hashlib.sha256()
    for path in (contacts_file, settings_file):
        digest.update((path.read_bytes() if path.exists() else b"") + b"\0")
    return digest.hexdigest()[:12]


def load_contact_mapping(mappings_dir: Path, contacts_file: Path | None = None) -> ContactMapping:
    """Read and check the mapping table and settings; raise ConfigError listing every problem."""
    read = read_settings(mappings_dir / SETTINGS_FILE)
    settings = read.settings
    path = contacts_file or mappings_dir / CONTACTS_FILE
    # a row is not judged by a setting that failed: its default is not what the analyst chose
    fields, table_problems, warnings = parse_contacts(path, settings, read.failed)
    problems = [*read.problems, *table_problems]
    warnings = [*read.warnings, *warnings, *_consent_warnings(fields, settings, mappings_dir / SETTINGS_FILE)]
    if problems:
        raise ConfigError(problems, warnings)
    return ContactMapping(tuple(fields), settings, mapping_version(fields, settings), tuple(warnings),
                          (file_version(path, mappings_dir / SETTINGS_FILE),))


def _consent_warnings(fields: list[FieldMapping], settings: SyncSettings, settings_file: Path) -> list[Problem]:
    if settings.force_optin and not any(f.remote_field == "marketing_optin" for f in fields):
        return [Problem(str(settings_file), 0, "mode", 'consent mode "authoritative" forces marketing_optin, but no '
                        "row maps to it: nothing is forced")]
    return []


def parse_contacts(path: Path, settings: SyncSettings, unsure: frozenset[str] = frozenset()
                   ) -> tuple[list[FieldMapping], list[Problem], list[Problem]]:
    """(fields, problems, warnings) of the mapping table. `unsure` names the settings that failed their own
    check (`*`: the settings file could not be read): no row is found wrong because of their defaults."""
    file = str(path)
    if not path.exists():
        return [], [Problem(file, 0, "", "mapping file not found")], []
    header, rows, problems = read_csv(path)
    if header is None:
        return [], problems or [Problem(file, 1, "", "the file is empty; it needs the header row " + ",".join(COLUMNS))], []
    header_problems = _header_problems(file, header)
    if header_problems:
        return [], [*problems, *header_problems], []
    fields, warnings, mapped = _mapped_rows(file, header, rows, settings, unsure, problems)
    if "email" not in mapped:
        problems.append(Problem(file, 0, "remote_field", "no row maps to 'email'; Ometria identifies "
                                "contacts by email: add the row 'email,email'"))
    return fields, problems, warnings


def _header_problems(file: str, header: list[str]) -> list[Problem]:
    """Unknown, missing and repeated columns: with any of them, no row can be read."""
    unknown = [h for h in header if h not in COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    duplicated = sorted({h for h in header if header.count(h) > 1})
    problems = [Problem(file, 1, name, f"unknown column {name!r}{did_you_mean(name, COLUMNS)}; the columns are "
                        + ", ".join(COLUMNS)) for name in unknown]
    problems += [Problem(file, 1, name, f"the header has no {name!r} column") for name in missing]
    problems += [Problem(file, 1, name, f"column {name!r} appears more than once") for name in duplicated]
    return problems


def _mapped_rows(file: str, header: list[str], rows: list, settings: SyncSettings, unsure: frozenset[str],
                 problems: list[Problem]) -> tuple[list[FieldMapping], list[Problem], dict[str, int]]:
    """(fields, warnings, {remote field: line}) of the rows; their problems are added to `problems` in the
    file's order."""
    fields: list[FieldMapping] = []
    warnings: list[Problem] = []
    mapped: dict[str, int] = {}
    for line, cells in rows_of(file, header, rows, problems):
        problems += _mapped_twice(file, line, cells.get("remote_field", ""), mapped)
        field, row_problems, row_warnings = _check_row(file, line, cells, settings, unsure)
        problems += row_problems
        warnings += row_warnings
        if field is not None:
            fields.append(field)
    return fields, warnings, mapped


def _mapped_twice(file: str, line: int, remote: str, mapped: dict[str, int]) -> list[Problem]:
    """A problem when the remote field is already mapped; else it is recorded in `mapped`."""
    if remote in mapped:
        return [Problem(file, line, "remote_field", f"{remote!r} is already mapped on line {mapped[remote]}; "
                        "map each remote field once")]
    if remote:
        mapped[remote] = line
    return []


Found = list[tuple[str, str]]  # (column, message) of one row


def _check_row(
    file: str, line: int, cells: dict[str, str], settings: SyncSettings, unsure: frozenset[str] = frozenset()
) -> tuple[FieldMapping | None, list[Problem], list[Problem]]:
    loyalty = cells.get("loyalty_field", "").removeprefix(CUSTOMER)
    remote = cells.get("remote_field", "")
    fmt, overwrite = cells.get("format", "").lower(), cells.get("overwrite_empty", "").lower()
    found: Found = [(column, f"{column} is empty; fill it in or delete the row")
                    for column, value in (("loyalty_field", loyalty), ("remote_field", remote)) if not value]
    entry = _check_loyalty(loyalty, settings, unsure, found)
    remote, warnings = _check_remote(remote, settings, unsure, found)
    fmt = _check_format(fmt, loyalty, remote, entry, found)
    _check_overwrite(overwrite, found)
    problems = [Problem(file, line, column, message) for column, message in found]
    warned = [Problem(file, line, "remote_field", message) for message in warnings]
    if problems or entry is None:
        return None, problems, warned
    field = FieldMapping(loyalty, remote, fmt or "string", overwrite in ("yes", "true"), remote in builtin_fields(), line)
    return field, [], warned


def _check_loyalty(loyalty: str, settings: SyncSettings, unsure: frozenset[str], found: Found) -> CatalogField | None:
    """The catalog entry of the row's loyalty field, or None (a problem is added when it is unknown)."""
    if not loyalty:
        return None
    entry = find_in_catalog(loyalty)
    if entry is None:
        names = [f.path for f in catalog()]
        why = not_offered(loyalty)
        found.append(("loyalty_field", f"unknown loyalty field {loyalty!r}{did_you_mean(loyalty, names)}; "
                      + (why or "`make fields` lists the loyalty fields")))
    elif settings.payload_mode not in entry.modes and not {"payload_mode", "*"} & unsure:
        found.append(("loyalty_field", f"{loyalty!r} comes from the {entry.module} module and is only "
                      "available in v2 mode: set payload_mode = \"v2\" in settings.toml or remove the row"))
    return entry


def _check_remote(remote: str, settings: SyncSettings, unsure: frozenset[str], found: Found) -> tuple[str, list[str]]:
    """(the remote field, "" when the sync sets it itself; warnings) of the row."""
    builtins = builtin_fields()
    warnings: list[str] = []
    if remote == "id" or remote.startswith("@"):
        found.append(("remote_field", f"{remote!r} is set by the sync itself (id is always the Antavo "
                      "customer ID); remove this row"))
        return "", warnings
    if remote and remote not in builtins:
        close = difflib.get_close_matches(remote, list(builtins), n=1, cutoff=0.8)
        if not re.match(CUSTOM_FIELD_ID, remote):
            found.append(("remote_field", f"{remote!r} is not a valid custom field ID: use the field ID from "
                          "Ometria's custom field settings (letters, digits, _ and -, no spaces)"))
        elif close:
            warnings.append(f"{remote!r} is sent as a custom field ID; if you meant Ometria's built-in field "
                            f"{close[0]!r}, fix the spelling")
    consent_known = not {"consent_mode", "*"} & unsure
    if remote in CONSENT_FIELDS and not settings.sends_consent and consent_known:
        found.append(("remote_field", f"{remote} is consent, and [consent] mode in settings.toml is \"never\": "
                      'set mode = "preference" (sent as mapped) or "authoritative" (Antavo\'s marketing_optin '
                      "forced over opt-outs elsewhere), or remove the row"))
    return remote, warnings


def _check_overwrite(overwrite: str, found: Found) -> None:
    if overwrite not in ("", "yes", "no", "true", "false"):
        found.append(("overwrite_empty", f"overwrite_empty must be yes or no, not {overwrite!r}"))


def _check_format(fmt: str, loyalty: str, remote: str, entry: CatalogField | None, found: Found) -> str:
    """The format the row's value is written in ("" when it cannot be told)."""
    fmt = _format_for(remote, _known_format(fmt, found), entry, found)
    _check_writable(fmt, loyalty, remote, entry, found)
    return fmt


def _known_format(fmt: str, found: Found) -> str:
    """The format the row names, or "" when it names none or one that does not exist."""
    if fmt and fmt not in FORMATS:
        found.append(("format", f"unknown format {fmt!r}{did_you_mean(fmt, FORMATS)}; formats: {', '.join(FORMATS)}"))
        return ""
    return fmt


def _format_for(remote: str, fmt: str, entry: CatalogField | None, found: Found) -> str:
    """A built-in field's own format; a custom field's, as named or from the loyalty field's."""
    builtins = builtin_fields()
    if remote in builtins:
        if fmt and fmt != builtins[remote]:
            found.append(("format", f"{remote} is always written as {builtins[remote]}; leave format empty"))
        return builtins[remote]
    if fmt and fmt not in CUSTOM_FORMATS:
        found.append(("format", f"custom fields take one of {', '.join(CUSTOM_FORMATS)}, not {fmt!r}"))
    elif not fmt and entry is not None:
        return entry.format if entry.format in CUSTOM_FORMATS else "string"
    return fmt


def _check_writable(fmt: str, loyalty: str, remote: str, entry: CatalogField | None, found: Found) -> None:
    writable = FORMATS[entry.format].writable_as if entry is not None and entry.format in FORMATS else None
    if entry is not None and fmt and writable is not None and fmt not in writable:
        found.append(("format", f"{loyalty!r} holds a {entry.format} and cannot be written as {fmt} "
                      f"({remote}); map a different field or change the format"))
