"""
### Antavo → Ometria contact sync

Reads Antavo loyalty customers, maps them to Ometria contacts with the analyst-edited tables in
`include/mappings/` (`contacts.csv`, `settings.toml`), holds back customers that fail the quality
gate (with every reason), and pushes the contacts that changed since they were last sent to
Ometria's push API in batches of 100.

**Flow:** check connections → plan → extract → transform (+ quality gate) → load → report. Data between tasks is staged
as files; XCom carries only paths and counts.

**Runs.** Each scheduled run reads the customers Antavo updated in its hourly data interval (plus a
small overlap), and the contacts still owed (rejected or not delivered before) that are due a retry. Every
`reconcile_every_hours` (and when triggered with `reconcile`) a run reads every customer and sends only
what differs from what Ometria accepted; members no longer active leave the configured list. The first run, a run after the mapping or settings changed, and a run triggered with
`full_resync` read and send every customer. A backfill re-sends the customers updated in its
intervals. `dry_run` computes and reports what would be sent, and sends nothing.

**Connections:** `antavo_default`, `ometria_default`, and optionally `antavo_ometria_state` (the state
store; a SQLite file in `$AIRFLOW_HOME` without it). The `report` task's log and return value hold the
run report, and the run history is kept in the state store.
"""

from __future__ import annotations

from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, get_current_context, task

from antavo_ometria.airflow.dag_defaults import CONTACTS_DAG as DAG_ID
from antavo_ometria.airflow.dag_defaults import DAG_ARGS, PUSH_POOL

OMETRIA_CONTACTS = Asset("ometria_contacts", uri="ometria://contacts")  # updated when contacts land in Ometria


def _staging():
    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.staged_files import staging_dir

    return staging_dir(staging_root(), DAG_ID, get_current_context()["run_id"])


def _mapping():
    from antavo_ometria.airflow.hooks import fail_fast_on
    from antavo_ometria.problems import ConfigError
    from antavo_ometria.sync.tables.mapping import load_contact_mapping
    from antavo_ometria.sync.tables.settings import mappings_dir

    with fail_fast_on(ConfigError):
        return load_contact_mapping(mappings_dir())


def _store():
    """The state store; if it cannot be reached the task fails before sending anything (and is retried)."""
    from antavo_ometria.airflow.hooks import StateStoreHook, fail_fast_on

    with fail_fast_on(ValueError):  # a connection that is malformed: retrying cannot mend it
        return StateStoreHook().get_conn()


@dag(
    dag_id=DAG_ID,
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    doc_md=__doc__,
    tags=["antavo", "ometria", "contacts"],
    **DAG_ARGS,
    params={
        "full_resync": Param(False, type="boolean", description="Read and send every customer, changed or not."),
        "dry_run": Param(False, type="boolean", description="Compute and report what would be sent; send nothing."),
        "reconcile": Param(False, type="boolean", description="Read every customer and send only what differs from "
                           "what Ometria accepted (runs by itself every reconcile_every_hours)."),
    },
)
def antavo_ometria_contacts():
    @task
    def check_connections() -> list[str]:
        """Connect first: a signed Antavo request, an authenticated Ometria call, and the configured list."""
        from antavo_ometria.airflow.hooks import connect_or_fail

        return connect_or_fail(_mapping().settings.list_id)

    # each step hands on one dict as one XCom: `-> dict` alone would also make Airflow store every key as an XCom
    # of its own (about 90 writes a run that nothing reads)
    @task(multiple_outputs=False)
    def plan() -> dict:
        """Check the mapping, then decide: full or incremental, and which window of Antavo updates.

        Also removes run folders, and held records released (delivered) since, older than the retention
        (ANTAVO_OMETRIA_STAGING_RETENTION_DAYS)."""
        import logging
        from datetime import UTC, datetime

        from antavo_ometria.airflow.staging_location import staging_root
        from antavo_ometria.sync.contacts.plan import plan_run
        from antavo_ometria.sync.contacts.staged_files import prune_staging, staging_retention

        context = get_current_context()
        store = _store()
        removed = prune_staging(staging_root(), DAG_ID, keep=_staging())
        forgotten = store.held.prune_released(datetime.now(UTC) - staging_retention())
        if removed or forgotten:
            logging.getLogger(__name__).info("retention: removed %d staging folder(s) and %d released held record(s)",
                                             len(removed), forgotten)
        return plan_run(
            store, _mapping(), DAG_ID, context["run_id"],
            interval=(context.get("data_interval_start"), context.get("data_interval_end")),
            run_type=getattr(context["dag_run"].run_type, "value", str(context["dag_run"].run_type)),
            full_resync=bool(context["params"]["full_resync"]),
            dry_run=bool(context["params"]["dry_run"]),
            reconcile=bool(context["params"].get("reconcile", False)),
        ).as_dict()

    @task(multiple_outputs=False)
    def extract(plan: dict) -> dict:
        """Read the planned Antavo customers into the staging folder."""
        from antavo_ometria.airflow.hooks import AntavoHook, fail_fast_on
        from antavo_ometria.sync.contacts.extract import extract
        from antavo_ometria.sync.contacts.step_results import Plan
        from antavo_ometria.transport import ApiError

        with fail_fast_on(ApiError):  # e.g. refused credentials; network trouble and 5xx are retried
            return extract(AntavoHook().get_conn(), _staging(), plan, Plan.of(plan).run_settings.customer_status,
                           _mapping().loyalty_fields).as_dict()

    @task(multiple_outputs=False)
    def transform(plan: dict, extracted: dict) -> dict:
        """Map customers to Ometria contacts, run the quality gate (Great Expectations), keep what changed.

        Customers that fail a check are quarantined with every reason; the run stops before sending
        when too many fail or a full load is far smaller than the last one.
        """
        from antavo_ometria.airflow.hooks import fail_fast_on
        from antavo_ometria.sync.contacts.prepare import transform_staged
        from antavo_ometria.sync.contacts.quality import QualityGateFailed

        with fail_fast_on(QualityGateFailed):
            return transform_staged(_staging(), _mapping(), plan, _store()).as_dict()

    @task(pool=PUSH_POOL, outlets=[OMETRIA_CONTACTS], multiple_outputs=False)
    def load(plan: dict, transformed: dict) -> dict:
        """Push contacts in batches of 100 under Ometria's rate limit; a retry skips delivered batches."""
        from antavo_ometria.airflow.hooks import OmetriaHook, fail_fast_on
        from antavo_ometria.sync.contacts.load import LoadFailed, load_staged
        from antavo_ometria.transport import ApiError

        with fail_fast_on(LoadFailed, ApiError):  # e.g. a refused API key; network trouble and 5xx are retried
            return load_staged(_staging(), OmetriaHook().get_conn(), plan, _store()).as_dict()

    @task(trigger_rule="all_done", multiple_outputs=False)
    def report() -> dict:
        """Write and log the run report and record the run in the state store, whatever happened; fail
        the run unless every contact was delivered or held back with a reason."""
        from antavo_ometria.airflow.hooks import fail_fast_on
        from antavo_ometria.sync.contacts.report import RunNotDelivered, report_run

        context = get_current_context()
        steps = {name: context["ti"].xcom_pull(task_ids=name)
                 for name in ("check_connections", "plan", "extract", "transform", "load")}
        store = _store()
        store.ensure_schema()  # the run may have stopped before its first task brought the schema up to date
        with fail_fast_on(RunNotDelivered):
            result = report_run(_staging(), steps, store, DAG_ID, context["run_id"])
        return {k: v for k, v in result.items() if k not in ("not_delivered", "async_errors", "history")} | {
            "not_delivered": len(result["not_delivered"]), "async_errors": len(result["async_errors"])}

    planned = plan()
    check_connections() >> planned
    extracted = extract(planned)
    transformed = transform(planned, extracted)
    load(planned, transformed) >> report()


antavo_ometria_contacts()
