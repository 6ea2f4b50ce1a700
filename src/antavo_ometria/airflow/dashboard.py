"""The sync dashboard: an HTML page drawn from the state store (served inside the Airflow UI).

Contacts sent, changed, quarantined and rejected per run as a chart; the latest quarantined and
rejected records with their reasons; the mapping versions over time; event triggers delivered and
late. Plain HTML and inline SVG: no scripts, nothing fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import html
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse

from antavo_ometria.airflow.dag_defaults import CONTACTS_DAG, EVENTS_DAG
from antavo_ometria.sync.contacts.step_results import RunStatus
from antavo_ometria.sync.events.report import latency

if TYPE_CHECKING:  # the plugin is loaded by every Airflow process: pandas and the clients load with the first page
    from antavo_ometria.sync.store.state import Latencies, StateStore
    from antavo_ometria.sync.trace import Trace

SERIES = (("sent", "#2a7ab9"), ("changed", "#8cc0e6"), ("quarantined", "#e0a030"), ("rejected", "#c0392b"))
STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2733;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.muted{color:#6b7785} table{border-collapse:collapse;width:100%;margin-top:4px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e7eb;vertical-align:top}
th{background:#f4f6f8;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{border:1px solid #e3e7eb;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:22px} .legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
.ok{color:#1e7d32} .bad{color:#c0392b}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def bar_chart(labels: list[str], series: dict[str, list[int]], width: int = 900, height: int = 220) -> str:
    """A grouped bar chart as inline SVG: one group per run, one bar per series."""
    if not labels:
        return '<p class="muted">No runs yet.</p>'
    top = max([1] + [v for values in series.values() for v in values])
    left, bottom, plot_h = 48, 36, height - 50
    group = min((width - left - 10) / len(labels), 90.0)
    bar = max(1.0, group * 0.8 / len(series))
    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="contacts per run">']
    for i in range(5):
        y = 10 + plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef1f4"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end" fill="#6b7785">'
                     f'{round(top * (4 - i) / 4)}</text>')
    colours = dict(SERIES)
    for g, label in enumerate(labels):
        x0 = left + g * group + group * 0.1
        for s, (name, values) in enumerate(series.items()):
            h = plot_h * values[g] / top
            parts.append(f'<rect x="{x0 + s * bar:.1f}" y="{10 + plot_h - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{colours[name]}"><title>{_e(label)}: {values[g]} {name}'
                         f'</title></rect>')
        if len(labels) <= 16 or g % max(1, len(labels) // 12) == 0:
            parts.append(f'<text x="{x0 + group * 0.4:.1f}" y="{height - bottom + 16}" font-size="10" '
                         f'text-anchor="middle" fill="#6b7785">{_e(label)}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{c}"></i>{n}</span>' for n, c in SERIES)
    return f'<div class="legend">{legend}</div>' + "".join(parts)


SEARCH = ('<form action="trace" method="get"><input name="q" size="40" placeholder="Antavo customer id or email">'
          ' <button>Trace a customer</button></form>')


def _minute(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M")


def _reasons(record: dict) -> str:
    return "<br>".join(_e(r) for r in record["reasons"])


def _or_none(rows: str, columns: int, text: str) -> str:
    """The table's rows, or one muted row saying there are none."""
    return rows or f"<tr><td colspan={columns} class=muted>{text}</td></tr>"


def _field_rows(fields: list[dict]) -> str:
    return "".join(
        f"<tr><td>{_e(f['remote_field'])}</td><td><code>{_e(f['loyalty_field'])}</code></td><td>{_e(f['antavo'])}</td>"
        f"<td>{_e(f['ometria'])}</td><td class={'ok' if f['verdict'] == 'ok' else 'bad'}>{_e(f['verdict'])}</td></tr>"
        for f in fields)


def _last_sent(sent: dict | None, differs: list[str]) -> str:
    if not sent:
        return "<p>Never sent to Ometria.</p>"
    differences = ("<ul>" + "".join(f"<li>differs now: {_e(d)}</li>" for d in differs) + "</ul>" if differs else "")
    return (f"<p>Last sent {_e(sent['synced_at'].strftime('%Y-%m-%d %H:%M:%S'))} UTC by run "
            f"<code>{_e(sent['run_id'])}</code>, mapping <code>{_e(sent['mapping_version'])}</code>, Ometria "
            f"request <code>{_e(sent['request_id'] or '—')}</code> ({_e(sent['status'])}).</p>" + differences)


def _history_rows(history: list[dict]) -> str:
    return "".join(
        f"<tr><td>{_e(_minute(h['created_at']))}</td><td>{_e(h['kind'])}</td><td>{_e(h['run_id'])}</td>"
        f"<td>{_reasons(h)}</td>"
        f"<td>{'released ' + _e(_minute(h['released_at'])) if h['released_at'] else 'not released'}"
        f"</td></tr>" for h in history)


def _customer_event_rows(events: list[dict]) -> str:
    return "".join(f"<tr><td>{_e(e['event_id'])}</td><td>{_e(e['rule'])}</td><td>{_e(e['when'])}</td>"
                   f"<td>{_e(e['status'])}</td></tr>" for e in events)


def render_trace(t: Trace) -> str:
    """One customer's page: what the mapping makes of her, what Ometria got, and why (see trace.py)."""
    verdict_class = "ok" if t.verdict.startswith("sent and current") else "bad"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Trace {_e(t.query)}</title>
<style>{STYLE}</style></head><body>
<h1>Customer {_e(t.customer_id or t.query)}</h1>{SEARCH}<p><a href="./">← the sync dashboard</a></p>
<p class="{verdict_class}"><b>{_e(t.verdict)}</b></p>
<h2>What the mapping makes of her today</h2><p class="muted">From {_e(t.source)}.</p>
<table><tr><th>Ometria field</th><th>loyalty field</th><th>Antavo value</th><th>Ometria value</th><th>check</th></tr>
{_or_none(_field_rows(t.fields), 5, 'No data.')}</table>
<h2>What Ometria got</h2>{_last_sent(t.last_sent, t.differs)}
<h2>Held back or rejected</h2><table><tr><th>when</th><th>kind</th><th>run</th><th>reasons</th><th>now</th></tr>
{_or_none(_history_rows(t.history), 5, 'Never.')}</table>
<h2>Her events</h2><table><tr><th>event</th><th>rule</th><th>when</th><th>outcome</th></tr>
{_or_none(_customer_event_rows(t.events), 4, 'None.')}</table>
</body></html>"""


def _cards(store: StateStore, runs: list[dict]) -> str:
    last = runs[-1] if runs else None
    return "".join(
        f'<div class="card"><span class="muted">{_e(title)}</span><b>{_e(value)}</b></div>' for title, value in (
            ("last run", f"{last['status']} · {last['mode']}" if last else "—"),
            ("contacts known to Ometria", store.contacts.known_count()),
            ("owed (rejected or not delivered)", store.contacts.owed_count()),
            ("mapping version", last["mapping_version"] if last else "—"),
            ("runs recorded", len(runs)),
        ))


def _run_rows(runs: list[dict]) -> str:
    """The latest twelve runs, newest first."""
    return "".join(
        f"<tr><td>{_e(_minute(r['started_at']))}</td><td class={'ok' if r['status'] == RunStatus.SUCCESS else 'bad'}>"
        f"{_e(r['status'])}</td><td>{_e(r['mode'])}</td>"
        + "".join(f"<td class=n>{int(r[k] or 0)}</td>" for k in ("extracted", "changed", "sent", "accepted", "rejected",
                                                                "quarantined", "failed"))
        + "</tr>" for r in reversed(runs[-12:]))


def _held_rows(held: list[dict]) -> str:
    return "".join(
        f"<tr><td>{_e(_minute(h['created_at']))}</td><td>{_e(h['kind'])}</td>"
        f"<td>{_e(h['antavo_id'])}</td><td>{_reasons(h)}</td></tr>" for h in held)


def _version_row(version: str, runs: list[dict]) -> str:
    first = min(r["started_at"] for r in runs)
    last = max(r["started_at"] for r in runs)
    note = next((r["full_resync_reason"] for r in sorted(runs, key=lambda r: r["started_at"])
                 if r["full_resync_reason"]), "")
    return (f"<tr><td><code>{_e(version)}</code></td><td>{_e(_minute(first))}</td>"
            f"<td>{_e(_minute(last))}</td><td class=n>{len(runs)}</td><td>{_e(note)}</td></tr>")


def _version_rows(runs: list[dict]) -> str:
    """One row per mapping version, the most recently used first."""
    versions: dict[str, list] = defaultdict(list)
    for run in runs:
        versions[run["mapping_version"]].append(run)
    latest_first = sorted(versions.items(), key=lambda item: max(r["started_at"] for r in item[1]), reverse=True)
    return "".join(_version_row(version, rs) for version, rs in latest_first)


def _event_row(rule: str, event_type: str, counts: dict[str, int], late: int, last_hour: Latencies | None) -> str:
    """One rule: the counts since the first delivery, then the last hour's deliveries (late ones too) and latency."""
    return (f"<tr><td>{_e(rule)}</td><td>{_e(event_type)}</td><td class=n>{counts.get('sent', 0)}</td>"
            f"<td class=n>{late}</td><td class=n>{counts.get('skipped_late', 0)}</td>"
            f"<td class=n>{counts.get('rejected', 0)}</td><td class=n>{last_hour.late if last_hour else 0}</td>"
            f"<td class=n>{_e(latency(last_hour.seconds if last_hour else []))}</td></tr>")


def _event_rows(summary: dict, latencies: dict[str, Latencies]) -> str:
    return "".join(_event_row(rule, event_type, counts, late, latencies.get(rule))
                   for (rule, event_type), (counts, late) in summary.items())


def render(store: StateStore, runs_shown: int = 30) -> str:
    runs = list(reversed(store.runs.recent(CONTACTS_DAG, limit=runs_shown)))
    finished = [r for r in runs if r["status"] in (RunStatus.SUCCESS, RunStatus.DRY_RUN)]
    labels = [r["started_at"].strftime("%m-%d %H:%M") for r in finished]
    chart = bar_chart(labels, {name: [int(r[name] or 0) for r in finished] for name, _ in SERIES})
    cards = _cards(store, runs)
    held_rows = _held_rows(store.held.find(limit=25))
    version_rows = _version_rows(store.runs.recent(CONTACTS_DAG, limit=500))
    latencies = store.events.latencies(datetime.now(UTC) - timedelta(hours=1))
    event_rows = _event_rows(store.events.summary(), latencies)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Antavo → Ometria sync</title>
<style>{STYLE}</style></head><body>
<h1>Antavo → Ometria sync</h1><p class="muted">From the sync's state store. Contacts per run of
<code>{CONTACTS_DAG}</code>, records held back with their reasons, mapping versions, event triggers.</p>
{SEARCH}
<div class="cards">{cards}</div>
<h2>Contacts per run</h2>{chart}
<h2>Recent runs</h2><table><tr><th>started</th><th>status</th><th>mode</th><th>extracted</th><th>changed</th>
<th>sent</th><th>accepted</th><th>rejected</th><th>quarantined</th><th>failed</th></tr>{_run_rows(runs)}</table>
<h2>Latest quarantined and rejected records</h2><table><tr><th>when</th><th>kind</th><th>Antavo ID</th><th>reasons</th></tr>
{_or_none(held_rows, 4, 'None.')}</table>
<h2>Mapping versions</h2><table><tr><th>version</th><th>first run</th><th>last run</th><th>runs</th><th>note</th></tr>
{_or_none(version_rows, 5, 'None.')}</table>
<h2>Event triggers</h2><p class="muted">Late: over 4 hours old when sent (an outage, a back-off): Ometria does not
start an automation for it. The last hour's latency counts every event sent in that hour, late ones too.</p>
<table><tr><th rowspan=2>rule</th><th rowspan=2>Ometria event type</th><th colspan=4>since the first delivery</th>
<th colspan=2>sent in the last hour</th></tr><tr><th>delivered</th><th>delivered late</th><th>skipped as late</th>
<th>rejected</th><th>late</th><th>event → Ometria: p50 / p95 / max (events)</th></tr>
{_or_none(event_rows, 8, 'None yet.')}</table>
</body></html>"""


# -- the app the plugin serves at /sync-dashboard/ -------------------------------------------
DAG_IDS = (CONTACTS_DAG, EVENTS_DAG)


def _state_url() -> str:
    """The `antavo_ometria_state` connection when there is one, as the DAGs use it; else the default."""
    from airflow.models.connection import Connection

    from antavo_ometria.airflow.hooks import state_store_url

    return state_store_url(Connection.get_connection_from_secrets)


_STORES: dict = {}  # one state store (and one schema check) per URL for the life of the API server


def _store():
    url = _state_url()
    if url not in _STORES:
        from antavo_ometria.sync.store.state import StateStore

        store = StateStore(url)
        store.ensure_schema()
        _STORES[url] = store
    return _STORES[url]


def _page() -> str:
    return render(_store())


def _trace_page(query: str) -> str:
    """One customer, read live from Antavo when its connection is set (else from the staging files)."""
    from dataclasses import replace

    from airflow.models.connection import Connection

    from antavo_ometria.airflow.hooks import antavo_config
    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.antavo.client import AntavoClient
    from antavo_ometria.sync.tables.mapping import load_contact_mapping
    from antavo_ometria.sync.tables.settings import mappings_dir
    from antavo_ometria.sync.trace import trace
    from antavo_ometria.transport import RetryPolicy

    if not query:
        return _page()
    try:  # a page should answer in seconds: two quick tries, then the staging files
        config = antavo_config(Connection.get_connection_from_secrets("antavo_default"))
        antavo = AntavoClient(replace(config, retry=RetryPolicy(attempts=2, backoff=0.5), timeout=10))
    except Exception:  # not set, or not usable: the page says where its data came from
        antavo = None
    return render_trace(trace(query, _store(), load_contact_mapping(mappings_dir()), antavo, staging_root()))


def _allowed(user) -> bool:
    """The page shows held records with emails and phone numbers: the same right as reading both DAGs' task logs."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    manager = get_auth_manager()
    return all(manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.TASK_LOGS,
                                         details=DagDetails(id=dag_id), user=user) for dag_id in DAG_IDS)


def create_app() -> FastAPI:
    app = FastAPI(title="Antavo → Ometria sync dashboard")

    async def authorise(request: Request) -> None:
        # Airflow's own login: the bearer token, or the UI's session cookie (imported here, not when the
        # plugin is loaded, so task processes that load plugins do not pay for the API server's modules)
        from airflow.api_fastapi.core_api.security import resolve_user_from_token

        header = request.headers.get("Authorization", "")
        user = await resolve_user_from_token(header[7:] if header.lower().startswith("bearer ") else
                                             request.cookies.get("_token"))
        if not _allowed(user):
            raise HTTPException(403, "reading the sync dashboard needs access to the task logs of "
                                     + " and ".join(DAG_IDS))

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> str:
        await authorise(request)
        return await asyncio.to_thread(_page)

    @app.get("/trace", response_class=HTMLResponse)
    async def customer_trace(request: Request, q: str = "") -> str:
        await authorise(request)
        return await asyncio.to_thread(_trace_page, q.strip())

    return app
