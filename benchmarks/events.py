"""Reward claim → Ometria latency on a real deployment; writes its figures into benchmarks/results.json and
BENCHMARKS.md (keeping every other figure).

    make bench-events                                   # 50 claims over 5 minutes
    python -m benchmarks.events --compare               # then the same against an AssetWatcher schedule
    python -m benchmarks.events --claims 10 --minutes 1  # a quick run

The real scheduler, dag-processor, triggerer and api-server on Airflow's embedded default (SQLite,
LocalExecutor) run the continuous events DAG against the sandbox. Claims are made at random gaps (fixed
seed). A claim's latency runs from the moment the Antavo sandbox lists it to the moment the Ometria sandbox
accepted its custom event; both clocks are the sandbox's own. Antavo requests are counted from the Antavo
sandbox's request log over the window, scaled to an hour. Every claim must be stored by Ometria exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.stack import AirflowStack

PROJECT = Path(__file__).resolve().parents[1]
DAG = "antavo_ometria_events"
SENSOR = "wait_for_events"
FEED = "/customers/-/events"
SEED = 24


def gaps(claims: int, minutes: float, seed: int = SEED) -> list[float]:
    """Random-ish waits between claims (exponential, as independent customers), scaled to span `minutes`."""
    rng = random.Random(seed)
    raw = [rng.expovariate(1.0) for _ in range(claims - 1)]
    return [g * minutes * 60 / sum(raw) for g in raw]


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with at least `share` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def measure(claims: int, minutes: float, poll_seconds: float, schedule: str = "continuous") -> dict:
    """Claims made at random gaps against the events DAG on a real deployment; `schedule` is the shipped
    `continuous` DAG or the `watcher` one (an Asset with an AssetWatcher, benchmarks/watcher_dag/)."""
    from antavo_ometria.sync.store.state import StateStore
    from antavo_ometria_tools.population import defects_of
    from antavo_ometria_tools.sandbox import Sandbox

    home = Path(tempfile.mkdtemp(prefix="bench-events-"))
    with Sandbox(customers=200) as sandbox:
        env = {**sandbox.connections(), "ANTAVO_OMETRIA_STAGING_DIR": str(home / "staging"),
               "ANTAVO_OMETRIA_STATE_URL": f"sqlite:///{home / 'state.db'}",
               "ANTAVO_OMETRIA_EVENT_POKE_SECONDS": str(poll_seconds), **WATCHER_ENV.get(schedule, {})}
        StateStore(env["ANTAVO_OMETRIA_STATE_URL"]).migrate()  # `make migrate`
        airflow = AirflowStack.local(home, env).start()
        try:
            airflow.unpause(DAG)
            watching(sandbox, airflow, schedule)
            customers = [c["_id"] for i, c in enumerate(sandbox.antavo.customers) if not defects_of(i)]
            made = claim_all(sandbox, customers, gaps(claims, minutes))
            delivered = wait_for(sandbox, made, timeout=300)
        finally:
            airflow.stop()
    return {**figures(sandbox, made, delivered, poll_seconds, home), "schedule": schedule}


# the AssetWatcher variant's DAGs and plugins folders (its trigger), with the project's mappings
WATCHER_ENV = {"watcher": {"AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "benchmarks" / "watcher_dag" / "dags"),
                           "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "benchmarks" / "watcher_dag" / "plugins"),
                           "ANTAVO_OMETRIA_MAPPINGS_DIR": str(PROJECT / "include" / "mappings")}}


def watching(sandbox, airflow: AirflowStack, schedule: str, timeout: float = 300) -> None:
    """Wait until the DAG watches Antavo: the continuous run's sensor deferred, or the watcher polling the feed."""
    if schedule == "continuous":
        airflow.wait_for_run(DAG, lambda states: states.get(SENSOR) == "deferred", timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    while not any(path == FEED for _, path in list(sandbox.antavo.request_times)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the AssetWatcher never read Antavo's event feed (Airflow logs in {airflow.home})")
        time.sleep(0.5)


def claim_all(sandbox, customers: list[str], waits: list[float]) -> dict[str, float]:
    """Make the claims; the Ometria event id of each → when Antavo listed it (epoch seconds)."""
    made = {}
    for n, wait in enumerate([0.0, *waits]):
        time.sleep(wait)
        event = sandbox.antavo.claim_reward(customers[n % len(customers)], "rw-coffee", at=datetime.now(UTC))
        made[f"reward_claimed:{event['id']}"] = time.time()  # listed by the feed from now on
        print(f"  claim {n + 1}/{len(waits) + 1}", flush=True)
    return made


def wait_for(sandbox, made: dict[str, float], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not set(made) <= set(sandbox.ometria.accepted_at):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    time.sleep(10)  # anything stored twice shows up now
    return True


def figures(sandbox, made: dict[str, float], delivered: bool, poll_seconds: float, home: Path) -> dict:
    accepted = sandbox.ometria.accepted_at
    latencies = [accepted[i] - at for i, at in made.items() if i in accepted]
    stored = {i: sandbox.ometria.received[("custom_event", i)] for i in made}
    start, end = min(made.values()), max(accepted.get(i, time.time()) for i in made)
    feed = sum(1 for at, path in sandbox.antavo.request_times if path == FEED and start <= at <= end)
    result = {
        "claims": len(made), "minutes": round((end - start) / 60, 1), "poll_seconds": poll_seconds,
        "delivered": sum(1 for i in made if i in accepted),
        "stored_once": sum(1 for n in stored.values() if n == 1),
        "stored_twice_or_more": sorted(i for i, n in stored.items() if n > 1),
        "missing": sorted(i for i in made if i not in accepted),
        "latency_p50_s": round(statistics.median(latencies), 1) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 0.95), 1) if latencies else None,
        "latency_max_s": round(max(latencies), 1) if latencies else None,
        "antavo_event_requests": feed,
        "antavo_event_requests_per_hour": round(feed * 3600 / (end - start)),
        "airflow_logs": str(home),
    }
    result["ok"] = delivered and result["stored_once"] == len(made)
    return result


def write(result: dict, watcher: dict | None, results_path: Path, report_path: Path) -> None:
    """Put the event figures into results.json, keeping every other key, and write BENCHMARKS.md from it; the
    AssetWatcher variant's figures when they were measured in the same sitting."""
    from benchmarks.run import keep_figures

    def kept(one: dict) -> dict:
        return {**{k: v for k, v in one.items() if k != "airflow_logs"},
                "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"}

    keep_figures(results_path, report_path, {
        "event_latency_p50_s": result["latency_p50_s"], "event_latency_p95_s": result["latency_p95_s"],
        "event_latency_max_s": result["latency_max_s"],
        "antavo_event_requests_per_hour": result["antavo_event_requests_per_hour"],
        "event_poll_seconds": result["poll_seconds"],
        "events": {**kept(result), **({"watcher": kept(watcher)} if watcher else {})},
    })


def main() -> None:
    from antavo_ometria.sync.tables.settings import SyncSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--poll-seconds", type=float, default=SyncSettings().event_poll_seconds)
    parser.add_argument("--compare", action="store_true",
                        help="then the same claims against the AssetWatcher variant (benchmarks/watcher_dag/)")
    parser.add_argument("--results", default=str(PROJECT / "benchmarks" / "results.json"))
    parser.add_argument("--output", default=str(PROJECT / "BENCHMARKS.md"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: Airflow's components are stopped too
    results = [measure(args.claims, args.minutes, args.poll_seconds, schedule)
               for schedule in ("continuous", "watcher")[:1 + args.compare]]
    for result in results:
        print(json.dumps(result, indent=2))
        if not result["ok"]:
            raise SystemExit(f"{result['schedule']}: not every claim reached Ometria exactly once: missing "
                             f"{result['missing']}, stored twice {result['stored_twice_or_more']} (Airflow logs in "
                             f"{result['airflow_logs']})")
        shutil.rmtree(result["airflow_logs"], ignore_errors=True)
        print(f"{result['schedule']}: p50 {result['latency_p50_s']} s, p95 {result['latency_p95_s']} s, max "
              f"{result['latency_max_s']} s; {result['antavo_event_requests_per_hour']} Antavo event-feed "
              f"requests/hour")
    write(*results[:2], Path(args.results), Path(args.output))
    print(f"wrote {args.results} and {args.output}")


if __name__ == "__main__":
    main()
