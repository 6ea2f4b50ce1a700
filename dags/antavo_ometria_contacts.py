"""
### Antavo → Ometria contact sync

Reads Antavo loyalty customers, maps them to Ometria contacts with the analyst-edited tables in
`include/mappings/` (`contacts.csv`, `settings.toml`), holds back customers whose values cannot be
sent (with the reason), and pushes the rest to Ometria's push API in batches of 100.

**Flow:** check mapping → extract → transform → load → report. Data between tasks is staged as
files under the staging folder; XCom carries only paths and counts.

**Connections:** `antavo_default` (API key/secret, `extra.environment`), `ometria_default` (API key).
The `report` task's return value and log hold the run report: extracted, sent, accepted, rejected,
quarantined and failed, with every customer that was not delivered and why.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

DAG_ID = "antavo_ometria_contacts"


def _staging():
    from antavo_ometria.settings import staging_dir

    return staging_dir(DAG_ID, get_current_context()["run_id"])


@dag(
    dag_id=DAG_ID,
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["antavo", "ometria", "contacts"],
    default_args={"owner": "data-engineering", "retries": 2, "retry_delay": timedelta(seconds=30)},
)
def antavo_ometria_contacts():
    @task
    def check_mapping() -> dict:
        """Validate the mapping table and settings; a broken file stops the run before any request."""
        from airflow.sdk.exceptions import AirflowFailException
        from antavo_ometria.mapping import load_contact_mapping
        from antavo_ometria.problems import ConfigError
        from antavo_ometria.settings import mappings_dir

        try:
            mapping = load_contact_mapping(mappings_dir())
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from None  # retrying cannot fix a file; fail at once
        return {"version": mapping.version, "fields": len(mapping.fields),
                "payload_mode": mapping.settings.payload_mode}

    @task
    def extract(mapping: dict) -> dict:
        """Read every Antavo customer (Loyalty Read API) into the staging folder."""
        from antavo_ometria.hooks import AntavoHook
        from antavo_ometria.mapping import load_contact_mapping
        from antavo_ometria.pipeline import extract_all
        from antavo_ometria.settings import mappings_dir

        settings = load_contact_mapping(mappings_dir()).settings
        return extract_all(AntavoHook().get_conn(), _staging(), settings.customer_status)

    @task
    def transform(extracted: dict) -> dict:
        """Map staged customers to Ometria contacts and run the quality gate (Great Expectations).

        Customers that fail a check are quarantined with every reason; the run stops before sending
        when too many fail or a full load is far smaller than the last one.
        """
        from airflow.sdk.exceptions import AirflowFailException
        from antavo_ometria.mapping import load_contact_mapping
        from antavo_ometria.pipeline import transform_staged
        from antavo_ometria.quality import QualityGateFailed
        from antavo_ometria.settings import mappings_dir

        try:
            return transform_staged(_staging(), load_contact_mapping(mappings_dir()))
        except QualityGateFailed as exc:
            raise AirflowFailException(f"quality gate: {exc}") from None  # the same data fails the same way

    @task
    def load(transformed: dict) -> dict:
        """Push contacts in batches of 100 under Ometria's rate limit; a retry skips delivered batches."""
        from antavo_ometria.hooks import OmetriaHook
        from antavo_ometria.pipeline import load_staged

        return load_staged(_staging(), OmetriaHook().get_conn())

    @task
    def report(extracted: dict, transformed: dict, loaded: dict) -> dict:
        """Write and log the run report; every extracted customer is delivered or listed with a reason."""
        import logging

        from antavo_ometria.pipeline import build_report, format_report

        result = build_report(_staging(), extracted, transformed, loaded)
        logging.getLogger(__name__).info("\n%s", format_report(result))
        return {k: v for k, v in result.items() if k not in ("not_delivered", "async_errors")} | {
            "not_delivered": len(result["not_delivered"]), "async_errors": len(result["async_errors"])}

    extracted = extract(check_mapping())
    transformed = transform(extracted)
    loaded = load(transformed)
    report(extracted, transformed, loaded)


antavo_ometria_contacts()
