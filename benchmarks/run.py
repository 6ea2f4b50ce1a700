"""Benchmarks of the contact sync on this machine; writes benchmarks/results.json and, from it, BENCHMARKS.md.

    make bench                                  # 100k and 1M customers
    python -m benchmarks.run --sizes 20000      # a quick run

Each measurement runs in its own process. Its memory is sampled as the sum over the process and its
workers (RSS, and PSS: pages shared by forked workers counted once). Synthetic populations are generated
once into bench-data/ (about 1.2 KB of JSON per customer). In the same run: a reference floor (DuckDB,
benchmarks/floor.py), the naive per-record loop (benchmarks/naive.py) and the pipeline, with their ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DATA = PROJECT / "bench-data"
V2_MAPPING = PROJECT / "include" / "mappings" / "examples" / "v2"


# -- data --------------------------------------------------------------------------------------
def population(size: int) -> Path:
    """bench-data/customers-<size>/customers.ndjson, in the shape extract stages (with a few malformed rows)."""
    from antavo_ometria.antavo.records import normalise_customer
    from antavo_ometria.sync.contacts.staged_files import write_customers
    from antavo_ometria_tools.population import make_customer

    folder = DATA / f"customers-{size}"
    if not (folder / "customers.ndjson").exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        pages = ([normalise_customer(make_customer(i)) for i in range(s, min(size, s + 10_000))]
                 for s in range(0, size, 10_000))
        write_customers(folder, pages)
        print(f"  generated {size} customers in {time.time() - started:.0f}s", flush=True)
    return folder


def staging_copy(source: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="bench-"))
    for name in ("customers.ndjson", "duplicate_ids.json"):
        (target / name).symlink_to(source / name)
    return target


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its ended children (the transform's workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Memory:
    """The peak memory of this process and its workers, sampled every 0.2 s while a measurement runs, and the
    CPU seconds they spent (wall time on a shared machine says little about the work done)."""

    def __init__(self, leave_out: tuple[int, ...] = ()) -> None:
        import threading

        self.leave_out = set(leave_out)  # processes that are not the sync's (a sandbox server)
        self.rss = self.pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Memory:
        self.cpu_s = -cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_s += cpu_seconds()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            rss = pss = 0
            for process in [me, *me.children(recursive=True)]:
                if process.pid in self.leave_out:
                    continue
                try:
                    info = process.memory_full_info()
                except psutil.Error:  # a worker that just ended
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.rss, self.pss = max(self.rss, rss / 2**20), max(self.pss, pss / 2**20)
            if self._stop.wait(0.2):
                return

    def figures(self) -> dict:
        return {"peak_rss_mb": round(self.rss), "peak_pss_mb": round(self.pss), "cpu_s": round(self.cpu_s, 2)}


# -- measurements (each in a child process) ----------------------------------------------------
def measure_transform(size: int, gate: bool) -> dict:
    """Staged customers → push-ready contacts, as the transform step runs (on its worker processes): without the
    quality gate (parse, map, encode, hash) or with it (and the quarantine, GX results and contacts files)."""
    from antavo_ometria.sync.contacts.columnar import prepared_chunks, transform_threads
    from antavo_ometria.sync.contacts.prepare import transform_staged
    from antavo_ometria.sync.tables.mapping import load_contact_mapping

    mapping = load_contact_mapping(V2_MAPPING)
    staging = staging_copy(population(size))
    with Memory() as memory:
        started = time.perf_counter()
        if gate:
            ready = transform_staged(staging, mapping, full_plan("bench", mapping)).changed
        else:
            ready = sum(len(chunk.encoded) for chunk in prepared_chunks(staging / "customers.ndjson", mapping,
                                                                        gate=False))
        seconds = time.perf_counter() - started
    shutil.rmtree(staging)
    return {"seconds": seconds, "rate": size / seconds, **memory.figures(), "ready": ready,
            "fields": len(mapping.fields), "threads": transform_threads()}


def measure_floor(size: int) -> dict:
    """The reference floor: DuckDB (two threads) reads the staged NDJSON and writes push-ready JSON."""
    from benchmarks.floor import transform_file

    target = Path(tempfile.mkdtemp(prefix="bench-floor-")) / "contacts.ndjson"
    with Memory() as memory:
        started = time.perf_counter()
        written = transform_file(population(size) / "customers.ndjson", target)
        seconds = time.perf_counter() - started
    shutil.rmtree(target.parent)
    return {"seconds": seconds, "rate": size / seconds, **memory.figures(), "ready": written}


def measure_object_storage(size: int) -> dict:
    """The transform step with the quality gate, staging in an S3-compatible bucket (moto in its own process on
    loopback) instead of local disk: every file read and written through Airflow's ObjectStoragePath."""
    import boto3
    from airflow.sdk import ObjectStoragePath

    from antavo_ometria.sync.contacts.prepare import transform_staged
    from antavo_ometria.sync.tables.mapping import load_contact_mapping

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                              aws_secret_access_key="s")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        source = population(size)
        for name in ("customers.ndjson", "duplicate_ids.json"):
            client.upload_file(str(source / name), "bench", f"run/{name}")
        os.environ["AIRFLOW_CONN_AWS_BENCH"] = json.dumps({"conn_type": "aws", "login": "k", "password": "s", "extra": {
            "endpoint_url": endpoint, "region_name": "us-east-1"}})
        mapping = load_contact_mapping(V2_MAPPING)
        staging = ObjectStoragePath("s3://aws_bench@bench/run")
        assert (staging / "customers.ndjson").exists()  # Airflow's providers and the connection, set up before timing
        with Memory() as memory:
            started = time.perf_counter()
            ready = transform_staged(staging, mapping, full_plan("s3", mapping)).changed
            seconds = time.perf_counter() - started
    finally:
        server.terminate()
    return {"seconds": seconds, "rate": size / seconds, **memory.figures(), "ready": ready}


def full_plan(run_id: str, mapping):
    """A full load's plan without a state store: every contact is sent."""
    from antavo_ometria.sync.contacts.step_results import Plan

    return Plan("benchmark", run_id, run_id, "full", "benchmark", None, True, False, mapping.version, None,
                datetime.now(UTC).isoformat(), None)


def measure_naive(size: int) -> dict:
    from antavo_ometria.sync.tables.mapping import load_contact_mapping
    from benchmarks.naive import transform_file

    mapping = load_contact_mapping(V2_MAPPING)
    path = population(size) / "customers.ndjson"
    with Memory() as memory:
        started = time.perf_counter()
        _, ready, _ = transform_file(path, mapping)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rate": size / seconds, **memory.figures(), "ready": ready}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SandboxProcess:
    """The Ometria sandbox in a process of its own, so the client does not share its interpreter."""

    def __init__(self, rate: float = 0.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "antavo_ometria_tools.sandbox", "--customers", "0", "--antavo-port", str(free_port()),
             "--ometria-port", str(self.port), "--ometria-rate", str(rate)],
            stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the sandbox did not start")

    def stats(self) -> dict:
        import requests

        return requests.get(f"{self.url}/_sandbox/stats", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _encoded(count: int) -> list[tuple[str, bytes]]:
    from antavo_ometria.antavo.records import normalise_customer
    from antavo_ometria.sync.contacts.prepare import prepare_contacts
    from antavo_ometria.sync.contacts.transform import customer_columns
    from antavo_ometria.sync.tables.mapping import load_contact_mapping
    from antavo_ometria_tools.population import make_customer

    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    customers = [normalise_customer(make_customer(i)) for i in range(count)]
    frame, encoded, gate = prepare_contacts(customer_columns(customers, mapping.loyalty_fields), mapping)
    return [(i, body) for i, body, ok in zip(frame["id"], encoded, gate.valid) if ok]


def measure_loader() -> dict:
    from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
    from antavo_ometria.ometria.push import batches
    from antavo_ometria_tools.sandbox import OMETRIA_KEY

    records = _encoded(51_000)[:50_000]
    results = {}
    for name, rate, count in (("unthrottled", 0.0, 50_000), ("limited", 4.0, 6_000)):
        sandbox = SandboxProcess(rate)
        try:
            client = OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.url, requests_per_second=rate))
            started = time.perf_counter()
            sent = sum(client.push_encoded("contact", bodies).accepted for _, bodies in batches(records[:count]))
            seconds = time.perf_counter() - started
            stats = sandbox.stats()
        finally:
            sandbox.stop()
        requests_made = -(-count // 100)
        results[name] = {"records": sent, "seconds": seconds, "records_per_s": sent / seconds,
                         "requests_per_s": requests_made / seconds, "throttled_429": stats["throttled"],
                         "limit_rps": rate}
    return results


INCREMENTAL_SHARE = 0.012  # 12,000 of 1,000,000 customers changed in the hour
LATENCY = 0.15  # seconds per Antavo request, as over the internet
WINDOW = datetime(2045, 1, 1, tzinfo=UTC)  # after every synthetic customer's own updated_at


def measure_incremental(size: int) -> dict:
    """An hour in which 1.2 % of `size` customers changed, against an Antavo sandbox (its own process) that takes
    0.15 s per request, at the client's default 20 requests/s: from the plan to push-ready contacts (extract,
    choosing profile reads or a Read API scan; transform, gate and state-store diff). Setup, not timed: a full
    sync already happened (its payload hashes are in the state store)."""
    from antavo_ometria.antavo.client import AntavoClient, AntavoConfig
    from antavo_ometria.sync.contacts.extract import extract
    from antavo_ometria.sync.contacts.prepare import transform_staged
    from antavo_ometria.sync.contacts.step_results import Plan
    from antavo_ometria.sync.store.state import StateStore
    from antavo_ometria.sync.tables.mapping import load_contact_mapping
    from antavo_ometria_tools.sandbox import ANTAVO_ENVIRONMENT, ANTAVO_KEY, ANTAVO_SECRET
    from benchmarks.antavo_server import changed_ids

    mapping = load_contact_mapping(V2_MAPPING)
    source = population(size)
    changed = round(size * INCREMENTAL_SHARE)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.antavo_server", "--customers", str(source / "customers.ndjson"),
         "--latency", str(LATENCY), "--changed", str(changed), "--changed-at", (WINDOW + timedelta(minutes=30)).isoformat(),
         "--port", str(port)], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        url = f"sqlite:///{work / 'state.db'}"
        setup = multiprocessing.get_context("fork").Process(target=_synced_before, args=(source, url))
        setup.start()  # in a process of its own (while the server loads), so that its memory is not counted
        setup.join()
        assert setup.exitcode == 0, "the setup (a full sync before the hour) failed"
        store = StateStore(url)
        assert server.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}"
        client = AntavoClient(AntavoConfig(url, ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT, read_api_url=url))
        plan = Plan("benchmark", "hour", "hour", "incremental", None, None, False, False, mapping.version,
                    WINDOW.isoformat(), (WINDOW + timedelta(hours=1)).isoformat(), size)
        staging = work / "hour"
        with Memory(leave_out=(server.pid,)) as memory:
            started = time.perf_counter()
            extracted = extract(client, staging, plan, paths=mapping.loyalty_fields)
            extract_seconds = time.perf_counter() - started
            transformed = transform_staged(staging, mapping, plan, store)
            seconds = time.perf_counter() - started
        requests_made = client.requests_made
        # the other way, on a sample: profile reads, one request per customer
        sample = changed_ids(size, changed)[:400]
        sampled = time.perf_counter()
        client.get_customers(sample, mapping.loyalty_fields)
        profile_rate = len(sample) / (time.perf_counter() - sampled)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work)
    return {"population": size, "changed_in_antavo": changed, "extracted": extracted.customers,
            "reads": extracted.reads, "reads_reason": extracted.reads_reason, "requests": requests_made,
            "push_ready": transformed.changed, "unchanged": transformed.unchanged,
            "quarantined": transformed.quarantined, "seconds": seconds, "extract_seconds": extract_seconds,
            **memory.figures(),
            "latency_s": LATENCY, "requests_per_s_limit": client.config.requests_per_second,
            "profile_reads_per_s": profile_rate, "profile_reads_estimate_s": changed / profile_rate}


def _synced_before(source: Path, url: str) -> None:
    """The full sync before the hour: every contact's payload hash in the state store."""
    from antavo_ometria.sync.contacts.prepare import transform_staged
    from antavo_ometria.sync.contacts.staged_files import read_contacts
    from antavo_ometria.sync.store.state import StateStore
    from antavo_ometria.sync.tables.mapping import load_contact_mapping

    mapping = load_contact_mapping(V2_MAPPING)
    store = StateStore(url)
    store.migrate()
    full = staging_copy(source)
    transform_staged(full, mapping, full_plan("full", mapping))
    store.contacts.record_accepted([(i, h) for i, _, h in read_contacts(full)], mapping.version, "full")
    shutil.rmtree(full)


def dag_parse_times() -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="bench-airflow-"))
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, check=True)
    report = subprocess.run([airflow, "dags", "report", "-o", "json"], env=env, capture_output=True, text=True,
                            check=True)
    shutil.rmtree(home)
    return json.loads(report.stdout.strip().splitlines()[-1])  # the JSON comes after any log lines


# -- the report --------------------------------------------------------------------------------
def child(kind: str, size: int = 0) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--measure", kind, "--size", str(size)], cwd=PROJECT,
                          capture_output=True, text=True, env={**os.environ, "GX_ANALYTICS_ENABLED": "false"})
    if done.returncode:
        raise RuntimeError(f"{kind} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}, {platform.machine()}"


def label(count: int) -> str:
    return f"{count // 1_000_000}m" if count % 1_000_000 == 0 else f"{count / 1000:g}k"


TARGETS = {  # what the pipeline is held to, for the largest population
    "transform_s": 8.0, "gate_s": 15.0, "peak_rss_mb": 1024, "naive_vs_transform": 5.0, "incremental_s": 120.0,
    "dag_parse_s": 0.5, "transform_vs_floor_cpu": 2.0, "gate_vs_floor_cpu": 3.5, "transform_vs_naive_cpu": 0.34,
    "per_million_3m_vs_1m": 1.1, "incremental_vs_floor": 1.3,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--output", default=str(PROJECT / "BENCHMARKS.md"))
    parser.add_argument("--results", default=str(PROJECT / "benchmarks" / "results.json"))
    parser.add_argument("--report-only", action="store_true", help="write BENCHMARKS.md from the results file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--large", type=int, default=LARGE, help="the size the gate is also measured at (0: keep "
                        "the results file's)")
    parser.add_argument("--step-only", action="store_true", help="measure only the transform step (floor, "
                        "transform, gate, naive loop at the sizes, and the gate at 3M), keeping the other figures of "
                        "the results file")
    args = parser.parse_args()
    if args.measure:
        measures = {"transform": lambda: measure_transform(args.size, gate=False),
                    "gate": lambda: measure_transform(args.size, gate=True), "floor": lambda: measure_floor(args.size),
                    "naive": lambda: measure_naive(args.size), "loader": measure_loader,
                    "incremental": lambda: measure_incremental(args.size),
                    "object_storage": lambda: measure_object_storage(args.size)}
        print(json.dumps(measures[args.measure]()))
        return
    if not args.report_only:
        earlier = json.loads(Path(args.results).read_text(encoding="utf-8")) if Path(args.results).exists() else {}
        measured = measure_step(args.sizes, earlier, args.large) if args.step_only else measure_all(args.sizes)
        kept = {key: value for key, value in earlier.items() if key.startswith(EVENT_KEYS + LOAD_KEYS)}
        Path(args.results).write_text(json.dumps({**measured, **kept}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.results}")
    write_report(Path(args.output), json.loads(Path(args.results).read_text(encoding="utf-8")))
    print(f"wrote {args.output}")


EVENT_KEYS = ("event", "antavo_event_requests_per_hour")  # written by benchmarks/events.py
LOAD_KEYS = ("load_step",)  # written by benchmarks/load.py
LARGE = 3_000_000  # the gate is measured here too: its cost per million must stay flat


def step_side_by_side(sizes: list[int]) -> dict:
    """The floor, transform, gate and naive loop at each size, one after the other, each in its own process."""
    by_size = {}
    for size in sizes:
        print(f"population of {size:,} …", flush=True)
        population(size)
        by_size[size] = {kind: child(kind, size) for kind in ("floor", "transform", "gate", "naive")}
        row = by_size[size]
        print("  " + ", ".join(f"{kind} {row[kind]['seconds']:.1f}s ({row[kind]['cpu_s']:.1f} CPU-s)" for kind in row),
              flush=True)
        row["json_mb"] = round(population(size).joinpath("customers.ndjson").stat().st_size / 1e6)
    return by_size


def step_figures(by_size: dict, large: dict | None, incremental: dict) -> dict:
    """The keys results.json keeps for the step: times, CPU seconds, memory, ratios, per-million at 3M."""
    largest = max(int(size) for size in by_size)
    top, n = by_size[largest], label(largest)
    per_million = {"gate_3m_per_million_s": round(large["seconds"] / 3, 2),
                   "gate_3m_per_million_cpu_s": round(large["cpu_s"] / 3, 2),
                   "peak_rss_3m_mb": large["peak_rss_mb"]} if large else {}
    return {
        f"transform_{n}_s": round(top["transform"]["seconds"], 2),
        f"gate_{n}_s": round(top["gate"]["seconds"], 2),
        f"peak_rss_{n}_mb": top["gate"]["peak_rss_mb"],
        f"peak_pss_{n}_mb": top["gate"]["peak_pss_mb"],
        f"naive_{n}_s": round(top["naive"]["seconds"], 2),
        f"floor_{n}_s": round(top["floor"]["seconds"], 2),
        **{f"{kind}_{n}_cpu_s": top[kind]["cpu_s"] for kind in ("transform", "gate", "naive", "floor")},
        **per_million,
        "incremental_floor_s": round(incremental["requests"] / incremental["requests_per_s_limit"], 1),
        "ratios": {
            "naive_vs_transform": round(top["naive"]["seconds"] / top["transform"]["seconds"], 2),
            "naive_vs_gate": round(top["naive"]["seconds"] / top["gate"]["seconds"], 2),
            "transform_vs_floor": round(top["transform"]["seconds"] / top["floor"]["seconds"], 2),
            "gate_vs_floor": round(top["gate"]["seconds"] / top["floor"]["seconds"], 2),
            "naive_vs_transform_cpu": round(top["naive"]["cpu_s"] / top["transform"]["cpu_s"], 2),
            "transform_vs_floor_cpu": round(top["transform"]["cpu_s"] / top["floor"]["cpu_s"], 2),
            "gate_vs_floor_cpu": round(top["gate"]["cpu_s"] / top["floor"]["cpu_s"], 2),
        },
        "targets": TARGETS,
        "sizes": {str(size): row for size, row in by_size.items()},
        **({"large": large} if large else {}),
    }


def measure_step(sizes: list[int], earlier: dict, large_size: int = LARGE) -> dict:
    """The transform step's figures measured again; the others (object storage, loader, the incremental hour, DAG
    parse times) kept from the results file, with the time they were measured."""
    started = time.time()
    by_size = step_side_by_side(sizes)
    large = None
    if large_size:
        print(f"gate at {large_size:,} …", flush=True)
        population(large_size)
        large = child("gate", large_size)
    return {**earlier, "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "machine": machine(),
            "minutes": round((time.time() - started) / 60, 1), "population": max(sizes),
            "others_measured_at": earlier.get("others_measured_at", earlier["measured_at"]),
            "load_average": os.getloadavg(), **step_figures(by_size, large or earlier.get("large"), earlier["incremental"])}


def measure_all(sizes: list[int]) -> dict:
    started = time.time()
    by_size = step_side_by_side(sizes)
    largest = max(sizes)
    print("object storage …", flush=True)
    remote = child("object_storage", largest)
    print("loader …", flush=True)
    loader = child("loader")
    print("incremental hour …", flush=True)
    incremental = child("incremental", largest)
    print("DAG parse times …", flush=True)
    parse = dag_parse_times()
    print(f"gate at {LARGE:,} …", flush=True)
    population(LARGE)
    large = child("gate", LARGE)
    n = label(largest)
    limited = loader["limited"]
    return {
        "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "machine": machine(),
        "minutes": round((time.time() - started) / 60, 1), "population": largest,
        "load_average": os.getloadavg(),
        f"incremental_{label(incremental['changed_in_antavo'])}_of_{n}_s": round(incremental["seconds"], 2),
        "loader_records_per_s": round(loader["unthrottled"]["records_per_s"]),
        "rate_limited_share_of_limit": round(limited["requests_per_s"] / limited["limit_rps"], 3),
        **step_figures(by_size, large, incremental),
        "object_storage": remote, "loader": loader, "incremental": incremental, "dag_parse": parse,
    }


def measured_when(results: dict) -> list[str]:
    """When the machine was shared (its load), and which figures an earlier run measured."""
    lines = []
    if "load_average" in results:
        load = results["load_average"]
        lines.append(f"The machine was shared while measuring (load average {load[0]:.1f} / {load[1]:.1f} / "
                     f"{load[2]:.1f} on 2 cores at the end): wall times are long; CPU seconds are the fair comparison.")
    if "others_measured_at" in results:
        lines.append(f"Only the transform step was measured again (`--step-only`); object storage, the loader, the "
                     f"incremental hour and DAG parse times are from the full run of {results['others_measured_at']}.")
    large = results.get("large")
    if large:
        lines.append(f"At 3,000,000 customers ({large.get('population_note', 'generated')}) the step with the gate "
                     f"took {large['seconds']:.1f} s, "
                     f"{large['cpu_s']:.1f} CPU-s ({results['gate_3m_per_million_cpu_s']:.1f} per million) and "
                     f"{large['peak_rss_mb']:,} MB at its peak.")
    return ["", " ".join(lines)] if lines else []


def keep_figures(results_path: Path, report_path: Path, figures: dict) -> None:
    """Put these figures into the results file, keeping every other key, and write BENCHMARKS.md from it."""
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    results.update(figures)
    results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if "sizes" in results:
        write_report(report_path, results)


def object_storage_line(results: dict, largest: int, top: dict) -> str:
    """The step with staging on object storage, against local disk when both were measured in the same run."""
    remote = results["object_storage"]
    line = (f"With staging on object storage (an S3-compatible server, moto, in its own process on loopback; every "
            f"file streamed through Airflow's ObjectStoragePath) the step with the gate took **{remote['seconds']:.1f} "
            f"s** ({remote['cpu_s']:.1f} CPU-s) for {largest:,} customers")
    if "others_measured_at" in results:  # measured by an earlier engine: not comparable with today's local disk
        return line + f", measured on {results['others_measured_at']} with the engine of that day."
    return line + (f" against {top['gate']['seconds']:.1f} s on local disk: "
                   f"{remote['seconds'] / top['gate']['seconds']:.2f}×.")


def _verdict(value: float, target: float) -> str:
    return "met" if value <= target else f"not met ({value / target:.1f}× the target)"


def cpu_targets(results: dict, n: str) -> list[str]:
    """The targets held in CPU seconds (user + system of every process of the step; a shared machine's load
    lengthens wall time, much less the work done), and the flat cost per million."""
    ratios, targets = results["ratios"], {**TARGETS, **results["targets"]}
    if f"gate_{n}_cpu_s" not in results:
        return []
    rows = [
        ("transform + encode, CPU vs the floor", ratios["transform_vs_floor_cpu"], targets["transform_vs_floor_cpu"]),
        ("with the gate, hashes and files, CPU vs the floor", ratios["gate_vs_floor_cpu"], targets["gate_vs_floor_cpu"]),
        ("transform + encode, CPU vs the naive loop", round(1 / ratios["naive_vs_transform_cpu"], 2),
         targets["transform_vs_naive_cpu"]),
    ]
    if "gate_3m_per_million_cpu_s" in results:
        rows.append(("gate: CPU per million at 3M vs at 1M",
                     round(results["gate_3m_per_million_cpu_s"] / results[f"gate_{n}_cpu_s"], 2),
                     targets["per_million_3m_vs_1m"]))
    inc_key = next((k for k in results if k.startswith("incremental_") and k.endswith(f"_of_{n}_s")), None)
    if inc_key and "incremental_floor_s" in results:
        rows.append((f"incremental hour vs its rate-limit floor ({results['incremental_floor_s']:.0f} s of requests)",
                     round(results[inc_key] / results["incremental_floor_s"], 2), targets["incremental_vs_floor"]))
    return [f"| {name} | {value:g}× | ≤ {target:g}× | {_verdict(value, target)} |" for name, value, target in rows]


def write_report(path: Path, results: dict) -> None:
    """BENCHMARKS.md from the results (benchmarks/results.json): every figure in it comes from there."""
    from benchmarks.load import load_section

    largest, n = results["population"], label(results["population"])
    top, ratios, targets, inc = results["sizes"][str(largest)], results["ratios"], results["targets"], results["incremental"]
    inc_key = f"incremental_{label(inc['changed_in_antavo'])}_of_{n}_s"
    parse_worst = max(float(str(row["duration"]).rstrip("s").split(":")[-1]) for row in results["dag_parse"])

    def verdict(value: float, target: float, at_least: bool = False) -> str:
        met = value >= target if at_least else value <= target
        return "met" if met else f"not met ({value / target:.1f}× the target)" if not at_least else \
            f"not met ({value / target:.2f} of it)"

    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (`python -m benchmarks.run`) on {results['measured_at']}, {results['machine']}; "
        f"{results['minutes']} minutes in all. The figures below are generated from "
        "[benchmarks/results.json](benchmarks/results.json), which holds every number measured. v2 mapping with "
        f"{top['gate']['fields']} fields (`include/mappings/examples/v2`); synthetic customers with tiers, accounts, "
        "expiring points, custom properties and ~2.8 % malformed rows. Each figure comes from its own process; "
        "memory is the peak over the process and its workers together.",
        *measured_when(results),
        "",
        f"## Targets ({largest:,} customers)",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        f"| transform + encode | {results[f'transform_{n}_s']:.1f} s | ≤ {targets['transform_s']:g} s "
        f"| {verdict(results[f'transform_{n}_s'], targets['transform_s'])} |",
        f"| with the quality gate, hashes and files | {results[f'gate_{n}_s']:.1f} s | ≤ {targets['gate_s']:g} s "
        f"| {verdict(results[f'gate_{n}_s'], targets['gate_s'])} |",
        f"| peak memory (RSS summed over the workers; PSS {results[f'peak_pss_{n}_mb']:,} MB) "
        f"| {results[f'peak_rss_{n}_mb']:,} MB | ≤ {targets['peak_rss_mb']:,} MB "
        f"| {verdict(results[f'peak_rss_{n}_mb'], targets['peak_rss_mb'])} |",
        f"| faster than the naive loop | {ratios['naive_vs_transform']:.1f}× | ≥ {targets['naive_vs_transform']:g}× "
        f"| {verdict(ratios['naive_vs_transform'], targets['naive_vs_transform'], at_least=True)} |",
        f"| an hour with {inc['changed_in_antavo']:,} changed, plan → push-ready | {results[inc_key]:.1f} s "
        f"| ≤ {targets['incremental_s']:g} s | {verdict(results[inc_key], targets['incremental_s'])} |",
        f"| DAG parse time (slowest file) | {parse_worst:.2f} s | ≤ {targets['dag_parse_s']:g} s "
        f"| {verdict(parse_worst, targets['dag_parse_s'])} |",
        *cpu_targets(results, n),
        "",
        "## Staged customers → push-ready contacts, side by side",
        "",
        "| customers | JSON staged | floor: DuckDB | transform + encode | + quality gate, hashes, files | naive loop "
        "| peak memory (gate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, row in results["sizes"].items():
        size_mb = row.get("json_mb") or ((DATA / f"customers-{size}" / "customers.ndjson").stat().st_size / 1e6
                                         if (DATA / f"customers-{size}" / "customers.ndjson").exists() else float("nan"))
        lines.append(
            f"| {int(size):,} | {size_mb:,.0f} MB | {row['floor']['seconds']:.1f} s "
            f"| {row['transform']['seconds']:.1f} s ({row['transform']['rate']:,.0f}/s) "
            f"| {row['gate']['seconds']:.1f} s ({row['gate']['rate']:,.0f}/s) | {row['naive']['seconds']:.1f} s "
            f"| {row['gate']['peak_rss_mb']:,} MB RSS, {row['gate']['peak_pss_mb']:,} MB PSS |")
    lines += [
        "",
        f"Ratios at {largest:,}: the naive loop takes **{ratios['naive_vs_transform']:.2f}×** the time of transform + "
        f"encode and {ratios['naive_vs_gate']:.2f}× that of the step with its gate; transform + encode takes "
        f"**{ratios['transform_vs_floor']:.2f}×** the floor's time, the whole step {ratios['gate_vs_floor']:.2f}×. "
        f"The pipeline runs in one process, on {top['gate'].get('threads', 2)} DuckDB threads. The floor "
        "(benchmarks/floor.py) writes the "
        "same fields with the same conversions but checks nothing; the naive loop does less than the pipeline "
        "(no per-row reasons, no GX result, no hashes, no files).",
        "",
        *([f"In CPU seconds (user + system, the process and its workers) at {largest:,}: floor "
           f"{results[f'floor_{n}_cpu_s']:.1f}, transform + encode {results[f'transform_{n}_cpu_s']:.1f}, with the "
           f"gate {results[f'gate_{n}_cpu_s']:.1f}, naive loop {results[f'naive_{n}_cpu_s']:.1f}: transform + encode "
           f"takes **{ratios['transform_vs_floor_cpu']:.2f}×** the floor's CPU and "
           f"{1 / ratios['naive_vs_transform_cpu']:.2f} of the naive loop's, the whole step "
           f"**{ratios['gate_vs_floor_cpu']:.2f}×** the floor's.", ""] if f"gate_{n}_cpu_s" in results else []),
        object_storage_line(results, largest, top),
        "",
        f"## An hour in which {inc['changed_in_antavo']:,} of {inc['population']:,} customers changed",
        "",
        f"Against an Antavo sandbox in its own process that answers each request after {inc['latency_s']:g} s, at the "
        f"client's default {inc['requests_per_s_limit']:g} requests/s: **{inc['seconds']:.1f} s** from the plan to "
        f"push-ready contacts, {inc['extract_seconds']:.1f} s of it reading Antavo ({inc['requests']:,} requests; "
        f"peak memory {inc['peak_rss_mb']:,} MB RSS, the sandbox server left out). The extract "
        f"step chose {inc['reads']}: \"{inc['reads_reason']}\". It staged {inc['extracted']:,} customers; "
        f"{inc['push_ready']:,} are ready to push, {inc['unchanged']:,} unchanged, {inc['quarantined']:,} quarantined. "
        f"Profile reads, measured on a sample, ran at {inc['profile_reads_per_s']:.1f}/s: the "
        f"{inc['changed_in_antavo']:,} would have taken about {inc['profile_reads_estimate_s']:,.0f} s.",
        "",
        "## Loader against the Ometria sandbox",
        "",
        "| sandbox | records | time | records/s | requests/s | 429s caused |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["loader"].values():
        limit = f"limited to {row['limit_rps']:.0f} req/s" if row["limit_rps"] else "no rate limit"
        share = f" ({row['requests_per_s'] / row['limit_rps']:.0%} of the limit)" if row["limit_rps"] else ""
        lines.append(f"| {limit} | {row['records']:,} | {row['seconds']:.1f} s | {row['records_per_s']:,.0f} "
                     f"| {row['requests_per_s']:.2f}{share} | {row['throttled_429']} |")
    lines += load_section(results)
    lines += [
        "",
        "## DAG parse times (`airflow dags report`)",
        "",
        "| file | duration | DAGs | tasks |",
        "|---|---|---|---|",
    ]
    for row in results["dag_parse"]:
        lines.append(f"| {Path(row['file']).name} | {row['duration']} | {row['dag_num']} | {row['task_num']} |")
    lines += event_section(results)
    kept = ""  # the reliability table (make reliability) is kept
    if path.exists() and "\n## Reliability\n" in path.read_text(encoding="utf-8"):
        kept = "\n## Reliability\n" + path.read_text(encoding="utf-8").split("\n## Reliability\n", 1)[1]
    path.write_text("\n".join(lines) + "\n" + kept, encoding="utf-8")


def event_section(results: dict) -> list[str]:
    """Reward claim → Ometria (`make bench-events`, benchmarks/events.py), when it was measured."""
    if "event_latency_p95_s" not in results:
        return []
    ev = results["events"]
    return [
        "",
        "## Reward claim → Ometria (`make bench-events`)",
        "",
        f"Measured by `make bench-events` (`python -m benchmarks.events`) on {ev['measured_at']}: the continuous events "
        "DAG on a real scheduler, dag-processor and triggerer (Airflow's embedded default: SQLite, LocalExecutor) "
        f"against the sandbox, {ev['claims']} reward claims at random gaps over {ev['minutes']:g} minutes, the "
        f"sensor polling Antavo every {results['event_poll_seconds']:g} s (`events.poll_seconds`). Latency runs "
        "from the moment the Antavo sandbox lists a claim to the moment the Ometria sandbox accepted its custom "
        "event.",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        f"| claim → accepted, p50 | {results['event_latency_p50_s']:.1f} s | | |",
        f"| claim → accepted, p95 | {results['event_latency_p95_s']:.1f} s | ≤ 60 s "
        f"| {'met' if results['event_latency_p95_s'] <= 60 else 'not met'} |",
        f"| claim → accepted, max | {results['event_latency_max_s']:.1f} s | | |",
        f"| Antavo event-feed requests per hour | {results['antavo_event_requests_per_hour']:,} "
        "| | of 90,000 an hour (1,500 a minute, shared stack) |",
        f"| claims stored by Ometria exactly once | {ev['stored_once']} / {ev['claims']} | all | "
        f"{'met' if ev['stored_once'] == ev['claims'] else 'not met'} |",
        *watcher_comparison(ev),
    ]


def watcher_comparison(ev: dict) -> list[str]:
    """The same claims against the AssetWatcher variant, when `--compare` measured it in the same sitting."""
    if "watcher" not in ev:
        return []
    rows = [("continuous DAG, deferrable sensor (shipped)", ev), ("Asset with an AssetWatcher", ev["watcher"])]
    return [
        "",
        f"**Continuous DAG or an AssetWatcher** (`python -m benchmarks.events --compare`): the same {ev['claims']} "
        "claims, right after, against the events DAG scheduled by an Asset whose AssetWatcher polls the feed in the "
        "triggerer at the same interval (benchmarks/watcher_dag/: its fast path only, not shipped).",
        "",
        "| schedule | p50 | p95 | max | feed requests per hour | stored once |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {one['latency_p50_s']:.1f} s | {one['latency_p95_s']:.1f} s | {one['latency_max_s']:.1f} s "
          f"| {one['antavo_event_requests_per_hour']:,} | {one['stored_once']} / {one['claims']} |"
          for name, one in rows],
    ]


if __name__ == "__main__":
    main()
