"""The load step alone on a staged run: peak memory and CPU seconds, this tree against another revision's.

    .venv/bin/python -m benchmarks.load --size 200000 --against main     # before (main) and after, side by side
    .venv/bin/python -m benchmarks.load --against main --repeat 3         # each three times, alternately
    .venv/bin/python -m benchmarks.load --size 20000                      # this tree only, a quick run

The staged run (contacts.parquet of `size` customers, shipped mapping, a full plan: every contact is sent) is
made once into bench-data/load-<size>/ by the transform step. Each measurement runs in its own process: a
fresh copy of the staged run, a fresh SQLite state store, and the Ometria sandbox in a process of its own with
no rate limit (left out of the memory figures; its CPU is not counted). `--against REV` exports REV with
`git archive`, installs it (`make install`: its own .venv) and runs the same measurement with that interpreter
first; with `--repeat`, the two alternate, and the medians are compared (the machine may be shared).
Writes its figures into benchmarks/results.json (`load_step`) and BENCHMARKS.md, keeping every other figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.run import DATA, PROJECT, Memory, SandboxProcess, full_plan, machine, population

SHIPPED_MAPPING = PROJECT / "include" / "mappings"  # the fields the sandbox account has


def staged_run(size: int) -> Path:
    """bench-data/load-<size>/contacts.parquet: the contacts the transform step stages for a full run."""
    from antavo_ometria.sync.contacts.prepare import transform_staged
    from antavo_ometria.sync.tables.mapping import load_contact_mapping

    folder = DATA / f"load-{size}"
    if not (folder / "contacts.parquet").exists():
        source = population(size)
        work = Path(tempfile.mkdtemp(prefix="bench-load-staging-"))
        for name in ("customers.ndjson", "duplicate_ids.json"):
            (work / name).symlink_to(source / name)
        mapping = load_contact_mapping(SHIPPED_MAPPING)
        transform_staged(work, mapping, full_plan("staged", mapping))
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "contacts.parquet", folder / "contacts.parquet")
        shutil.rmtree(work)
    return folder / "contacts.parquet"


def measure(size: int) -> dict:
    """One load step, as the DAG's load task runs it, of the staged run of `size` customers."""
    import psutil
    import pyarrow.parquet as pq

    import antavo_ometria
    from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
    from antavo_ometria.sync.contacts.load import load_staged
    from antavo_ometria.sync.store.state import StateStore
    from antavo_ometria.sync.tables.mapping import load_contact_mapping
    from antavo_ometria_tools.sandbox import OMETRIA_KEY

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    staging = work / "run"
    staging.mkdir()
    shutil.copy(DATA / f"load-{size}" / "contacts.parquet", staging / "contacts.parquet")
    store = StateStore(f"sqlite:///{work / 'state.db'}")
    store.migrate()
    plan = full_plan("load", load_contact_mapping(SHIPPED_MAPPING))
    sandbox = SandboxProcess(0.0)
    try:
        client = OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.url, requests_per_second=0))
        rss_before = psutil.Process().memory_info().rss / 2**20
        with Memory(leave_out=(sandbox.process.pid,)) as memory:
            started = time.perf_counter()
            loaded = load_staged(staging, client, plan, store)
            seconds = time.perf_counter() - started
        received = sandbox.stats()
    finally:
        sandbox.stop()
    staged = pq.ParquetFile(staging / "contacts.parquet").metadata
    shutil.rmtree(work)
    return {"code": str(Path(antavo_ometria.__file__).parents[1]), "staged": staged.num_rows,
            "row_groups": staged.num_row_groups, "accepted": loaded.accepted, "seconds": round(seconds, 2),
            "rss_before_mb": round(rss_before), **memory.figures(), "sandbox": received}


def child(size: int, python: str = sys.executable) -> dict:
    """One measurement in a process of its own, by `python` (another revision's install) or this tree's."""
    done = subprocess.run([python, "-m", "benchmarks.load", "--measure", "--size", str(size)], cwd=PROJECT,
                          capture_output=True, text=True, env={**os.environ, "GX_ANALYTICS_ENABLED": "false"})
    if done.returncode:
        raise RuntimeError(f"the load of {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def installed(revision: str) -> tuple[Path, str]:
    """REV exported to a temporary folder and installed there (`make install`), and its commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=PROJECT, capture_output=True, text=True,
                            check=True).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix=f"bench-load-{commit}-"))
    archive = subprocess.run(["git", "archive", commit], cwd=PROJECT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    subprocess.run(["make", "-C", str(folder), "install"], check=True, capture_output=True)
    return folder, commit


def this_tree() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=PROJECT, capture_output=True, text=True,
                           check=True).stdout.strip()
    return commit + (" (with uncommitted changes)" if dirty else "")


def load_section(results: dict) -> list[str]:
    """The load step's figures (`python -m benchmarks.load`), when measured: for BENCHMARKS.md."""
    if "load_step" not in results:
        return []
    ls = results["load_step"]
    rows = [f"| {run['label']} | {run['staged']:,} | {run['seconds']:.1f} s | {run['cpu_s']:.1f} "
            f"| {run['peak_rss_mb']:,} MB | {run['peak_rss_mb'] - run['rss_before_mb']:,} MB |" for run in ls["runs"]]
    rows += [f"| **{label}, median of {len(runs)}** | | {median(r['seconds'] for r in runs):.1f} s "
             f"| **{median(r['cpu_s'] for r in runs):.1f}** | **{median(r['peak_rss_mb'] for r in runs):,.0f} MB** "
             f"| {median(r['peak_rss_mb'] - r['rss_before_mb'] for r in runs):,.0f} MB |"
             for label, runs in by_label(ls["runs"]).items() if len(runs) > 1]
    return [
        "",
        "## The load step alone (`python -m benchmarks.load`)",
        "",
        f"Measured on {ls['measured_at']}, {ls['machine']}: the load step of a staged full run ({ls['size']:,} "
        "customers through the shipped mapping; every staged contact pushed in batches of 100, each answer recorded "
        "in a SQLite state store) against the Ometria sandbox in its own process with no rate limit. Memory is the "
        "peak RSS of the step's process (the sandbox left out); *growth* is that peak less the process's RSS before "
        "the step began (Python, pyarrow, SQLAlchemy loaded). The machine was shared (load average "
        f"{ls['load_average'][0]:.1f} on 2 cores at the end): wall times vary; CPU seconds and memory compare. "
        "Before (3aca675 and earlier) the load read every staged contact (id, body, hash) into one list, beside a "
        "dict of every body for the state store; now it holds their ids, hashes and sizes and reads the bodies 2,000 "
        "at a time as it sends them. What still grows with the run is per contact: those ids and hashes, and the "
        "account of the load journal the load keeps for the report (`summarise_load`, `load_outcome.json`).",
        "",
        "| code | contacts | time | CPU s | peak RSS | growth |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def by_label(runs: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for run in runs:
        grouped.setdefault(run["label"], []).append(run)
    return grouped


def median(values) -> float:
    return statistics.median(list(values))


def write(runs: list[dict], size: int, results_path: Path, report_path: Path) -> None:
    from benchmarks.run import keep_figures

    keep_figures(results_path, report_path, {"load_step": {
        "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "machine": machine(), "size": size,
        "load_average": os.getloadavg(), "runs": runs}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--against", help="a git revision to measure first (before), e.g. main")
    parser.add_argument("--repeat", type=int, default=1, help="measure each this many times, alternately")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(PROJECT / "BENCHMARKS.md"))
    parser.add_argument("--results", default=str(PROJECT / "benchmarks" / "results.json"))
    parser.add_argument("--no-write", action="store_true", help="print the figures only")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.size)))
        return
    staged_run(args.size)
    runs = []
    other, commit = installed(args.against) if args.against else (None, "")
    here = f"after: {this_tree()}" if args.against else f"this tree: {this_tree()}"
    for _ in range(args.repeat):
        if other is not None:
            runs.append({"label": f"before: {args.against}" + (f" ({commit})" if commit != args.against else ""),
                         **child(args.size, str(other / ".venv" / "bin" / "python"))})
        runs.append({"label": here, **child(args.size)})
    if other is not None:
        shutil.rmtree(other)
    for run in runs:
        print(f"{run['label']}: {run['staged']:,} staged, {run['accepted']:,} accepted in {run['seconds']:.1f} s, "
              f"{run['cpu_s']:.1f} CPU-s, peak RSS {run['peak_rss_mb']:,} MB "
              f"(+{run['peak_rss_mb'] - run['rss_before_mb']:,} MB over {run['rss_before_mb']:,} MB before the step)",
              flush=True)
    if not args.no_write:
        write(runs, args.size, Path(args.results), Path(args.output))


if __name__ == "__main__":
    main()
