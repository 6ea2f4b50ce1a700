"""The quality gate: Great Expectations checks of every contact against Ometria's contract.

The suite is derived from the mapping: `id` present and unique, email present and well formed,
each field in its Ometria format (dates, ISO 8601 timestamps, gender, country, E.164 phone, consent
values), custom fields of their declared type, records within 60 KB. Rows that fail any of these
are quarantined with every failed check and the offending value; the rest go on. Batch checks: a
full load much smaller than the last one stops the run (an Antavo filter that silently returned
nothing), and a mapped field that is empty for every customer is reported as a warning.

Each rule is computed per chunk as a boolean column, and reasons are built only for failing rows; the GX suite
validates the chunks' check frames in large blocks (GxBlock), and the run stops if it finds other rows.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from antavo_ometria.ometria.contract import CONTROL_CHARACTERS, MAX_EXACT_NUMBER, MAX_RECORD_BYTES
from antavo_ometria.ometria.formats import FORMATS
from antavo_ometria.sync.tables.mapping import ContactMapping, FieldMapping
from antavo_ometria.sync.tables.settings import SyncSettings

log = logging.getLogger(__name__)

SHARE_MIN_ROWS = 100  # below this, one bad customer is no sign of a broken batch: it is just quarantined
ALL_TEXT = "text:all"
SOURCE = "antavo_record"  # reasons found when Antavo's record was read (see antavo.HELD)
NOT_TEXT = "text:kinds"  # per row: the first text field whose value is no text, or None


class QualityGateFailed(Exception):
    """The batch as a whole failed the gate; nothing has been sent."""


@dataclass
class GateResult:
    """The row-level verdict on one chunk of contacts."""

    valid: pd.Series  # bool per row
    failures: dict[int, list[dict]]  # row → every failed check, with field, value and message
    checked: int
    non_null: dict[str, int] = field(default_factory=dict)  # remote field → rows that carry a value
    validation: dict = field(default_factory=dict)  # GX's own result, as JSON (when validated on its own)
    checks: pd.DataFrame | None = None  # the check frame GX validates (see GxBlock)
    expected: list[np.ndarray] = field(default_factory=list)  # per rule, the rows that fail it

    @property
    def quarantined(self) -> int:
        return len(self.failures)

    def reasons_count(self) -> Counter:
        return Counter(f["check"] for fails in self.failures.values() for f in fails)


def batch_verdict(checked: int, quarantined: int, non_null: dict[str, int], previous_count: int | None,
                  fields: Sequence[FieldMapping], settings: SyncSettings) -> tuple[list[str], list[str]]:
    """(problems that stop the run, warnings) for a whole run, whose rows were checked chunk by chunk."""
    blocking, warnings = [], []
    if previous_count:
        minimum = math.ceil(previous_count * settings.min_rows_vs_last_run)
        if checked < minimum:
            blocking.append(f"{checked} customers, fewer than {minimum} "
                            f"({settings.min_rows_vs_last_run:.0%} of the last full load, {previous_count})")
    share = quarantined / checked if checked else 0.0
    if share > settings.max_invalid_share and checked >= SHARE_MIN_ROWS:
        blocking.append(f"{quarantined} of {checked} customers ({share:.1%}) failed the checks, "
                        f"more than the allowed {settings.max_invalid_share:.1%} (quality.max_invalid_share)")
    if checked >= 20:
        warnings += [f"{f.remote_field} ({f.loyalty_field}) is empty for every customer: is the path right?"
                     for f in fields if not non_null.get(f.remote_field)]
    return blocking, warnings


@dataclass(frozen=True)
class Check:
    """One row-level rule: a Great Expectations expectation, and the same rule as a boolean column."""

    kind: str  # not_null, null, unique, at_most, match, not_match, in_set, not_in_set
    column: str  # of the check frame
    name: str  # the check a quarantine reason names
    message: str
    arg: object = None  # the regex, value set or maximum

    def failing(self, checked: pd.DataFrame) -> np.ndarray:
        """Per row, whether it breaks the rule, computed as GX's pandas engine does (nulls pass but for the
        null checks)."""
        column = checked["id" if self.kind == "unique" else self.column]
        if self.kind in ("not_null", "null"):
            return column.isna().to_numpy() if self.kind == "not_null" else column.notna().to_numpy()
        present = column.notna().to_numpy()
        if self.kind == "unique":
            found = column.duplicated(keep=False).to_numpy()
        elif self.kind == "at_most":
            found = ~(column <= self.arg).to_numpy()
        elif self.kind in ("match", "not_match"):
            found = column.astype(str).str.contains(self.arg).fillna(False).to_numpy(dtype=bool)
            found = ~found if self.kind == "match" else found
        else:
            found = column.isin(self.arg).to_numpy()
            found = ~found if self.kind == "in_set" else found
        return present & found

    def expectation(self, number: int):
        import great_expectations.expectations as gxe

        made = {"not_null": lambda: gxe.ExpectColumnValuesToNotBeNull(column=self.column),
                "null": lambda: gxe.ExpectColumnValuesToBeNull(column=self.column),
                "unique": lambda: gxe.ExpectColumnValuesToBeUnique(column=self.column),
                "at_most": lambda: gxe.ExpectColumnValuesToBeBetween(column=self.column, max_value=self.arg),
                "match": lambda: gxe.ExpectColumnValuesToMatchRegex(column=self.column, regex=self.arg),
                "not_match": lambda: gxe.ExpectColumnValuesToNotMatchRegex(column=self.column, regex=self.arg),
                "in_set": lambda: gxe.ExpectColumnValuesToBeInSet(column=self.column, value_set=self.arg),
                "not_in_set": lambda: gxe.ExpectColumnValuesToNotBeInSet(column=self.column, value_set=self.arg),
                }[self.kind]()
        made.meta = {"check": self.name, "message": self.message, "rule": number}
        return made


UNIQUE_IN_CHUNK = "id:chunk"  # the id qualified by its chunk: GX checks ids unique per chunk, in blocks of chunks


def row_checks(fields: Sequence[FieldMapping], duplicate_ids: Collection[str] = ()) -> list[Check]:
    """Every row-level rule of the mapping, in the order reasons are reported."""
    checks = [
        Check("not_null", "id", "id_missing", "the customer has no id"),
        Check("unique", UNIQUE_IN_CHUNK, "id_duplicate", "duplicate customer id {value}"),
        Check("at_most", "record_bytes", "record_too_large",
              f"the record is {{value}} bytes; Ometria accepts at most {MAX_RECORD_BYTES}", MAX_RECORD_BYTES),
    ]
    for f in fields:
        col, fmt = f.remote_field, FORMATS[f.format]
        bad = f"{col}: {f.loyalty_field} = {{value}} is not {fmt.description}"
        if fmt.pattern:
            checks.append(Check("match", col, fmt.check, bad, fmt.pattern))
        elif fmt.values:
            checks.append(Check("in_set", col, fmt.check, bad, sorted(fmt.values())))
        elif fmt.types:
            checks.append(Check("in_set", f"{col}:type", fmt.check, bad, list(fmt.types)))
        if fmt.numeric:
            checks.append(Check("in_set", f"{col}:range", "number_range",
                                f"{col}: {f.loyalty_field} = {{value}} is out of range (Ometria takes finite numbers "
                                f"up to ±{MAX_EXACT_NUMBER:,}; larger ones lose digits)", ["ok"]))
    if any(FORMATS[f.format].text for f in fields):  # one check over all text fields, joined by tabs
        checks.append(Check("not_match", ALL_TEXT, "control_characters",
                            "{field}: {loyalty} contains control characters", CONTROL_CHARACTERS))
        checks.append(Check("null", NOT_TEXT, "text_type", "{value}"))
    email = next((f for f in fields if f.remote_field == "email"), None)
    if email is not None:
        checks.append(Check("not_null", "email", "email_missing", f"email: {email.loyalty_field} is empty"))
    checks.append(Check("null", SOURCE, SOURCE, "{value}"))
    if duplicate_ids:
        checks.append(Check("not_in_set", "id", "id_duplicate", "duplicate customer id {value}",
                            sorted(duplicate_ids)))
    return checks


def check_frame(frame: pd.DataFrame, mapping: ContactMapping, record_bytes: Sequence[int],
                source_problems: pd.Series | None = None) -> pd.DataFrame:
    """What the suite looks at: the payload values as text, a type name per typed field, each record's size."""
    checked = pd.DataFrame({"row": np.arange(len(frame)), "id": _as_text(frame["id"]).to_numpy()})
    for f in mapping.fields:
        values = frame[f.remote_field]
        types = values.map(type) if FORMATS[f.format].types or FORMATS[f.format].numeric else None
        column = _type_names(types) if FORMATS[f.format].types else _as_text(values)
        checked[_checked_column(f)] = column.to_numpy()
        if FORMATS[f.format].numeric:
            checked[f"{f.remote_field}:range"] = _in_range(values, types).to_numpy()
    checked[SOURCE] = None
    if source_problems is not None and source_problems.notna().any():
        present = source_problems.notna()
        checked[SOURCE] = source_problems.where(~present, source_problems[present].map(_joined)).to_numpy()
    text = [checked[f.remote_field].astype("str") for f in mapping.fields if FORMATS[f.format].text]
    if text:
        checked[NOT_TEXT] = _first_not_text(frame, mapping).to_numpy()
        checked[ALL_TEXT] = text[0].str.cat(text[1:], sep="\t", na_rep="") if len(text) > 1 else text[0]
    checked["record_bytes"] = np.asarray(record_bytes, dtype=np.int64)
    return checked.astype({c: "str" for c in checked.columns if c not in ("row", "record_bytes")})


def _checked_column(f: FieldMapping) -> str:
    return f"{f.remote_field}:type" if FORMATS[f.format].types else f.remote_field


def _as_text(values: pd.Series) -> pd.Series:
    """Text for the regex and set checks; a value of another type shows as its repr (and fails them)."""
    if values.dtype != object or pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):
        return values
    return values.map(lambda v: v if v is None or isinstance(v, str) else repr(v))


def _first_not_text(frame: pd.DataFrame, mapping: ContactMapping) -> pd.Series:
    """Per row, a message naming the first text field whose value is not text (a list, a number kept as it
    came because it is no usable text), or None."""
    found = pd.Series(None, index=frame.index, dtype=object)
    for f in mapping.fields:
        if not FORMATS[f.format].text:
            continue
        values = frame[f.remote_field]
        wrong = values.notna() & ~_of_kind(values.map(type), str)
        if wrong.any():
            message = values[wrong].map(lambda v, f=f: f"{f.remote_field}: {f.loyalty_field} = {_show(v)} is not text")
            found = found.where(found.notna() | ~wrong, message)
    return found


def _of_kind(types: pd.Series, kinds, but=()) -> np.ndarray:
    """Per value (given its type), whether it is one of `kinds` and none of `but`: decided once per type."""
    return types.map({t: issubclass(t, kinds) and not issubclass(t, but) for t in types.unique()}).to_numpy(dtype=bool)


def _in_range(values: pd.Series, types: pd.Series) -> pd.Series:
    """"ok" for a number JSON carries exactly, "out of range" for one it does not (inf, 1e30, 2**63), None otherwise."""
    numbers = values[_of_kind(types, (int, float, np.integer, np.floating), but=(bool, np.bool_))].astype(float)
    verdict = pd.Series(None, index=values.index, dtype=object)
    verdict[numbers.index] = np.where(np.isfinite(numbers) & (numbers.abs() <= MAX_EXACT_NUMBER), "ok", "out of range")
    return verdict


def _joined(reasons: object) -> str | None:
    if reasons is None or (isinstance(reasons, float) and math.isnan(reasons)):
        return None
    items = reasons if isinstance(reasons, (list, tuple, np.ndarray)) else [reasons]
    return "; ".join(str(r) for r in items) or None


def _type_names(types: pd.Series) -> pd.Series:
    return types.map({t: None if t is type(None) else t.__name__ for t in types.unique()})


def check_rows(
    frame: pd.DataFrame,
    mapping: ContactMapping,
    record_bytes: Sequence[int],
    duplicate_ids: Collection[str] = (),
    source_problems: pd.Series | None = None,
) -> GateResult:
    """The verdict on one chunk of the payload frame from the rules as boolean columns, with what Great
    Expectations must find in it (`checks`, `expected`) when a GxBlock validates it; see the module docstring.

    `duplicate_ids` are IDs seen more than once in the whole run (possibly in other chunks);
    `source_problems` the reasons, per row, why Antavo's record could not be used as it was.
    """
    checked = check_frame(frame, mapping, record_bytes, source_problems)
    rules = row_checks(mapping.fields, duplicate_ids)
    failing = [rule.failing(checked) for rule in rules]
    failures = _failures(rules, failing, _FailingValues(frame, checked), mapping)
    result = GateResult(valid=pd.Series(True, index=frame.index), failures=failures, checked=len(frame))
    result.non_null = {f.remote_field: int(frame[f.remote_field].notna().sum()) for f in mapping.fields}
    if failures:
        result.valid.iloc[list(failures)] = False
    needed = list(dict.fromkeys(["id", *(r.column for r in rules if r.column != UNIQUE_IN_CHUNK)]))
    result.checks = checked[needed]
    result.expected = [np.flatnonzero(rows) for rows in failing]
    return result


class _FailingValues:
    """Payload values, taken out of their columns only for the rows that fail."""

    def __init__(self, frame: pd.DataFrame, checked: pd.DataFrame):
        self.frame, self.checked, self.columns = frame, checked, {}

    def __call__(self, column: str, row: int) -> object:
        if column not in self.columns:
            source = self.checked if column in ("record_bytes", SOURCE, NOT_TEXT) else self.frame
            self.columns[column] = source[column].to_numpy(dtype=object)
        return self.columns[column][row]


def _failures(rules: list, failing: list[np.ndarray], value_of: _FailingValues,
              mapping: ContactMapping) -> dict[int, list[dict]]:
    """Each failing row's failures, by row number: built for the failing rows only."""
    failures: dict[int, list[dict]] = {}
    for rule, rows in zip(rules, failing, strict=True):
        for row in np.flatnonzero(rows).tolist():
            failures.setdefault(row, []).extend(_failures_of(rule, row, value_of, mapping))
    return {row: _causes(fails) for row, fails in failures.items()}


def _failures_of(rule, row: int, value_of: _FailingValues, mapping: ContactMapping) -> list[dict]:
    """What one rule found wrong in one row."""
    if rule.column == ALL_TEXT:  # which text fields hold the control characters
        return [{"check": rule.name, "field": f.remote_field, "value": value,
                 "message": rule.message.format(field=f.remote_field, loyalty=f.loyalty_field)}
                for f in mapping.fields
                if FORMATS[f.format].text and isinstance(value := value_of(f.remote_field, row), str)
                and re.search(CONTROL_CHARACTERS, value)]
    if rule.column in (SOURCE, NOT_TEXT):  # the checked value is the message itself
        return [{"check": rule.name, "field": "", "value": None, "message": value_of(rule.column, row)}]
    field_name = rule.column.split(":")[0]
    value = value_of(field_name, row)
    return [{"check": rule.name, "field": field_name, "value": _jsonable(value),
             "message": rule.message.format(value=_show(value))}]


def run_gate(frame: pd.DataFrame, mapping: ContactMapping, record_bytes: Sequence[int],
             duplicate_ids: Collection[str] = (), source_problems: pd.Series | None = None) -> GateResult:
    """Check one frame of contacts and validate it with Great Expectations at once (a few customers: an event
    delivery, a trace); see check_rows."""
    result = check_rows(frame, mapping, record_bytes, duplicate_ids, source_problems)
    block = GxBlock(mapping, duplicate_ids)
    block.add(result)
    result.validation = block.validate()
    return result


class GateDisagrees(QualityGateFailed):
    """Great Expectations and the boolean columns found different failing rows: the run stops, sending nothing."""


class GxBlock:
    """Chunks' check frames, validated by the GX suite together (its fixed cost per call is paid once per block),
    whose failing rows must be exactly the ones the boolean columns found."""

    def __init__(self, mapping: ContactMapping, duplicate_ids: Collection[str] = ()) -> None:
        self.mapping, self.rules = mapping, row_checks(mapping.fields, duplicate_ids)
        self.frames: list[pd.DataFrame] = []
        self.expected: list[list[np.ndarray]] = [[] for _ in self.rules]
        self.rows = 0

    def add(self, result: GateResult) -> None:
        checked = result.checks.copy()
        checked.insert(0, "row", np.arange(self.rows, self.rows + len(checked)))
        checked[UNIQUE_IN_CHUNK] = f"{len(self.frames)}:" + checked["id"]
        self.frames.append(checked)
        for found, rows in zip(self.expected, result.expected, strict=True):
            found.append(rows + self.rows)
        self.rows += len(checked)

    def validate(self) -> dict:
        """GX's result (JSON) on the block; raises GateDisagrees when its failing rows differ from the columns'."""
        import great_expectations as gx

        frames, self.frames = self.frames, []  # held once: the chunks' frames go as the block's frame is made
        checked = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        del frames
        suite = gx.ExpectationSuite(name=f"ometria_contacts_{self.mapping.version}",
                                    expectations=[rule.expectation(i) for i, rule in enumerate(self.rules)])
        validation = _validator(checked).validate_expectation_suite(suite)
        outcomes = {outcome.expectation_config.meta["rule"]: outcome for outcome in validation.results}
        if sorted(outcomes) != list(range(len(self.rules))):
            raise GateDisagrees(f"Great Expectations returned {len(outcomes)} results for {len(self.rules)} checks")
        for rule, expected, outcome in zip(self.rules, self.expected, (outcomes[i] for i in range(len(self.rules))),
                                           strict=True):
            if outcome.exception_info.get("raised_exception"):
                raise QualityGateFailed(f"check {rule.name} could not run: "
                                        f"{outcome.exception_info.get('exception_message')}")
            found = [] if outcome.success else outcome.result.get("unexpected_index_list") or []
            # the failing rows, as one list (values excluded: they are the quarantine's) or one per hit
            rows = np.sort(np.asarray([int(r) for hit in found for r in np.atleast_1d(hit["row"])], dtype=np.int64))
            wanted = np.concatenate(expected) if expected else np.zeros(0, dtype=np.int64)
            if not np.array_equal(rows, wanted):
                differ = sorted(set(rows.tolist()) ^ set(wanted.tolist()))[:5]
                raise GateDisagrees(f"Great Expectations and the engine's checks disagree on {rule.name} "
                                    f"({rule.column}) for rows {differ} of a block of {self.rows}: nothing was sent")
        self.expected, self.rows = [[] for _ in self.rules], 0
        return validation.to_json_dict()


def _causes(fails: list[dict]) -> list[dict]:
    """The failures that explain a row, without their consequences: a record Antavo sent broken fails other
    checks only because it is broken, and a number out of range is no type error."""
    source = [f for f in fails if f["check"] == SOURCE]
    if source:
        return source
    out_of_range = {f["field"] for f in fails if f["check"] == "number_range"}
    return [f for f in fails if not (f["check"] == "type" and f["field"] in out_of_range)]


def _validator(checked: pd.DataFrame):
    """A GX validator over the frame, in an ephemeral context made once per process. (It reads the frame once;
    `get_batch(...).validate(...)` would read, and fingerprint, it twice.)"""
    global _ASSET
    from great_expectations.validator.v1_validator import Validator

    if _ASSET is None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        _ASSET = context.data_sources.add_pandas("staged").add_dataframe_asset("contacts")
    definition = next(iter(_ASSET.batch_definitions), None) or _ASSET.add_batch_definition_whole_dataframe("run")
    return Validator(batch_definition=definition, batch_parameters={"dataframe": checked}, result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": ["row"],
        "return_unexpected_index_query": False, "exclude_unexpected_values": True})


_ASSET = None


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (str, bool, int, float, list, dict)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
