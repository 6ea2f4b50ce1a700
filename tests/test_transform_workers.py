"""The transform step's worker processes: how many, where they may not run, failures, and their end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.sync import prepare
from antavo_ometria.sync.mapping import load_contact_mapping
from antavo_ometria.sync.staging import write_customers
from antavo_ometria_tools.population import make_population

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def staged(tmp_path) -> Path:
    write_customers(tmp_path, [[normalise_customer(c) for c in make_population(600)]])
    return tmp_path / "customers.ndjson"


def mapping():
    return load_contact_mapping(PROJECT / "include" / "mappings")


def test_the_number_of_workers_comes_from_the_environment_or_the_cores(monkeypatch):
    monkeypatch.delenv(prepare.WORKERS, raising=False)
    assert 1 <= prepare.transform_workers() <= 4
    monkeypatch.setenv(prepare.WORKERS, "3")
    assert prepare.transform_workers() == 3
    for wrong in ("auto", "0", "-2", "1.5"):
        monkeypatch.setenv(prepare.WORKERS, wrong)
        with pytest.raises(ValueError, match="ANTAVO_OMETRIA_TRANSFORM_WORKERS must be a whole number"):
            prepare.transform_workers()


def _prepare_in_a_daemon(path: str, results) -> None:
    try:
        chunks = list(prepare.prepared_chunks(Path(path), mapping(), rows=250, workers=2))
        results.put([len(c.ids) for c in chunks])
    except BaseException as exc:  # noqa: BLE001  (reported to the test)
        results.put(repr(exc))


def test_in_a_daemon_process_as_under_celery_the_chunks_are_prepared_in_process(staged):
    """A Celery pool process is a daemon, and so is the task Airflow forks from it: a daemon may not start
    processes (multiprocessing refuses), so the transform runs in it rather than failing."""
    import billiard

    results = billiard.Queue()
    daemon = billiard.Process(target=_prepare_in_a_daemon, args=(str(staged), results), daemon=True)
    daemon.start()
    outcome = results.get(timeout=120)
    daemon.join(timeout=30)
    assert outcome == [250, 250, 100]


def test_a_failure_in_a_worker_fails_the_step(staged, monkeypatch):
    """Workers are forked: the failing function below is theirs too. The error reaches the task, which fails."""
    original = prepare.transform

    def fails_on_the_second_chunk(columns, mapping_, *args):
        if columns["id"].iloc[0] == "c00000250":
            raise RuntimeError("broken chunk")
        return original(columns, mapping_, *args)

    monkeypatch.setattr(prepare, "transform", fails_on_the_second_chunk)
    with pytest.raises(RuntimeError, match="broken chunk"):
        list(prepare.prepared_chunks(staged, mapping(), rows=250, workers=2))


CHILD = """
import json, sys, time
from antavo_ometria.sync.prepare import worker_pool
pool = worker_pool(2)
pids = sorted({pool.submit(__import__("os").getpid).result() for _ in range(8)})
print(json.dumps(pids), flush=True)
time.sleep(600)
"""


def test_workers_end_when_the_task_process_is_killed():
    """An out-of-memory kill ends only the task's process: its workers must not live on, orphaned."""
    if sys.platform != "linux":
        pytest.skip("the parent-death signal is Linux's")
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        workers = json.loads(child.stdout.readline())
        assert workers and child.pid not in workers
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [pid for pid in workers if _alive(pid)]
        assert not alive
    finally:
        child.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended; it only waits to be reaped
    except FileNotFoundError:
        return False
