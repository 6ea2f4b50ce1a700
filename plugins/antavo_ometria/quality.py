"""The quality gate: Great Expectations checks of every contact against Ometria's contract.

The suite is derived from the mapping: `id` present and unique, email present and well formed,
each field in its Ometria format (dates, ISO 8601 timestamps, gender, country, E.164 phone, consent
values), custom fields of their declared type, records within 60 KB. Rows that fail any of these
are quarantined with every failed check and the offending value; the rest go on. Batch checks: a
full load much smaller than the last one stops the run (an Antavo filter that silently returned
nothing), and a mapped field that is empty for every customer is reported as a warning.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from antavo_ometria.mapping import ContactMapping, FieldMapping
from antavo_ometria.ometria import MAX_RECORD_BYTES
from antavo_ometria.transform import EMAIL, OPTIN, PHONE_E164, iso_countries

log = logging.getLogger(__name__)

ISO_DATETIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[+-]\d{2}:\d{2}|Z)$"
CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
TYPE_NAMES = {"number": ["int", "float"], "integer": ["int"], "boolean": ["bool"], "list": ["list"]}
DESCRIBE = {
    "email": "an email address", "gender": "m or f", "country": "an ISO 3166-1 alpha-2 country code",
    "phone": "an E.164 phone number", "date": "a YYYY-MM-DD date", "datetime": "an ISO 8601 date-time",
    "optin": "a consent value", "number": "a number", "integer": "a whole number", "boolean": "true or false",
    "list": "a list",
}


class QualityGateFailed(Exception):
    """The batch as a whole failed the gate; nothing has been sent."""


@dataclass
class GateResult:
    valid: pd.Series  # bool per row
    failures: dict[int, list[dict]]  # row → every failed check, with field, value and message
    checked: int
    warnings: list[str] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)
    empty_share: dict[str, float] = field(default_factory=dict)
    validation: dict = field(default_factory=dict)  # GX's own result, as JSON

    @property
    def quarantined(self) -> int:
        return len(self.failures)

    def reasons_count(self) -> dict[str, int]:
        return dict(Counter(f["check"] for fails in self.failures.values() for f in fails))

    def summary(self) -> dict:
        return {"checked": self.checked, "passed": self.checked - self.quarantined,
                "quarantined": self.quarantined, "quarantined_by_check": self.reasons_count(),
                "warnings": self.warnings, "blocking": self.blocking, "empty_share": self.empty_share}


def _row_checks(fields: Sequence[FieldMapping]) -> list[tuple[object, str, str]]:
    """(expectation, check name, message template) for every row-level rule of the mapping."""
    import great_expectations.expectations as gxe

    checks: list[tuple[object, str, str]] = [
        (gxe.ExpectColumnValuesToNotBeNull(column="id"), "id_missing", "the customer has no id"),
        (gxe.ExpectColumnValuesToBeUnique(column="id"), "id_duplicate", "duplicate customer id {value}"),
        (gxe.ExpectColumnValuesToBeBetween(column="record_bytes", max_value=MAX_RECORD_BYTES), "record_too_large",
         f"the record is {{value}} bytes; Ometria accepts at most {MAX_RECORD_BYTES}"),
    ]
    for f in fields:
        col, fmt = f.remote_field, f.format
        bad = f"{col}: {f.loyalty_field} = {{value}} is not {DESCRIBE.get(fmt, fmt)}"
        if fmt == "email":
            checks.append((gxe.ExpectColumnValuesToMatchRegex(column=col, regex=EMAIL), "email_format", bad))
        elif fmt == "gender":
            checks.append((gxe.ExpectColumnValuesToBeInSet(column=col, value_set=["m", "f"]), "gender", bad))
        elif fmt == "country":
            checks.append((gxe.ExpectColumnValuesToBeInSet(column=col, value_set=sorted(iso_countries())),
                           "country", bad))
        elif fmt == "phone":
            checks.append((gxe.ExpectColumnValuesToMatchRegex(column=col, regex=PHONE_E164), "phone", bad))
        elif fmt == "date":
            checks.append((gxe.ExpectColumnValuesToMatchStrftimeFormat(column=col, strftime_format="%Y-%m-%d"),
                           "date_format", bad))
        elif fmt == "datetime":
            checks.append((gxe.ExpectColumnValuesToMatchRegex(column=col, regex=ISO_DATETIME),
                           "datetime_format", bad))
        elif fmt == "optin":
            checks.append((gxe.ExpectColumnValuesToBeInSet(column=col, value_set=sorted(OPTIN)), "consent", bad))
        elif fmt in TYPE_NAMES:
            checks.append((gxe.ExpectColumnValuesToBeInSet(column=f"{col}:type", value_set=TYPE_NAMES[fmt]),
                           "type", bad))
        if fmt in ("string", "email"):
            checks.append((gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=CONTROL_CHARACTERS),
                           "control_characters", f"{col}: {f.loyalty_field} contains control characters"))
    email = next((f for f in fields if f.remote_field == "email"), None)
    if email is not None:
        checks.append((gxe.ExpectColumnValuesToNotBeNull(column="email"), "email_missing",
                       f"email: {email.loyalty_field} is empty"))
    return checks


def check_frame(frame: pd.DataFrame, mapping: ContactMapping, record_bytes: Sequence[int]) -> pd.DataFrame:
    """What the suite looks at: the payload values, a type name per typed field, each record's size."""
    checked = pd.DataFrame({"row": range(len(frame))}, index=frame.index)
    checked["id"] = frame["id"]
    for f in mapping.fields:
        values = frame[f.remote_field]
        if f.format in TYPE_NAMES:
            checked[f"{f.remote_field}:type"] = values.map(lambda v: None if v is None else type(v).__name__)
        else:
            checked[f.remote_field] = values.where(values.map(lambda v: v is None or isinstance(v, str)),
                                                   values.map(repr))
    checked["record_bytes"] = list(record_bytes)
    return checked.reset_index(drop=True)


def run_gate(
    frame: pd.DataFrame,
    mapping: ContactMapping,
    record_bytes: Sequence[int],
    previous_count: int | None = None,
) -> GateResult:
    """Validate the payload frame with Great Expectations; see the module docstring."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    checked = check_frame(frame, mapping, record_bytes)
    row_checks = _row_checks(mapping.fields)
    batch_checks = []
    settings = mapping.settings
    if previous_count:
        minimum = math.ceil(previous_count * settings.min_rows_vs_last_run)
        batch_checks.append((gxe.ExpectTableRowCountToBeBetween(min_value=minimum), "row_count",
                             f"{len(frame)} customers, fewer than {minimum} "
                             f"({settings.min_rows_vs_last_run:.0%} of the last full load, {previous_count})"))
    warn_checks = [
        (gxe.ExpectColumnValuesToNotBeNull(column=f.remote_field if f.format not in TYPE_NAMES
                                           else f"{f.remote_field}:type", mostly=1e-9),
         "field_empty", f"{f.remote_field} ({f.loyalty_field}) is empty for every customer: is the path right?")
        for f in mapping.fields
    ] if len(frame) >= 20 else []

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("staged").add_dataframe_asset("contacts")
             .add_batch_definition_whole_dataframe("run").get_batch(batch_parameters={"dataframe": checked}))
    expectations = []
    for check, name, message in row_checks + batch_checks + warn_checks:
        check.meta = {"check": name, "message": message}
        expectations.append(check)
    suite = context.suites.add(gx.ExpectationSuite(name=f"ometria_contacts_{mapping.version}",
                                                   expectations=expectations))
    validation = batch.validate(suite, result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": ["row"], "return_unexpected_index_query": False,
    })

    failures: dict[int, list[dict]] = {}
    result = GateResult(valid=pd.Series(True, index=frame.index), failures=failures, checked=len(frame))
    for outcome in validation.results:
        name, message = outcome.expectation_config.meta["check"], outcome.expectation_config.meta["message"]
        if outcome.exception_info.get("raised_exception"):
            raise QualityGateFailed(f"check {name} could not run: {outcome.exception_info.get('exception_message')}")
        if outcome.success:
            continue
        if name == "row_count":
            result.blocking.append(message)
        elif name == "field_empty":
            result.warnings.append(message)
        else:
            field_name = outcome.expectation_config.kwargs["column"].split(":")[0]
            for hit in outcome.result.get("unexpected_index_list") or []:
                row = int(hit["row"])
                value = checked.at[row, field_name] if field_name == "record_bytes" else frame.iloc[row][field_name]
                failures.setdefault(row, []).append({
                    "check": name, "field": field_name, "value": _jsonable(value),
                    "message": message.format(value=_show(value)),
                })
    if failures:
        result.valid.iloc[list(failures)] = False
    result.empty_share = {f.remote_field: round(float(frame[f.remote_field].isna().mean()), 4)
                          for f in mapping.fields} if len(frame) else {}
    result.validation = validation.to_json_dict()
    share = result.quarantined / len(frame) if len(frame) else 0.0
    if share > settings.max_invalid_share:
        result.blocking.append(f"{result.quarantined} of {len(frame)} customers ({share:.1%}) failed the checks, "
                               f"more than the allowed {settings.max_invalid_share:.1%} (quality.max_invalid_share)")
    return result


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (str, bool, int, float, list, dict)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
