"""The transform step's parallelism: DuckDB's threads in the task's own process, however many, wherever it runs
(a Celery pool process is a daemon and may not start processes), and failures that fail the step."""

from __future__ import annotations

from pathlib import Path

import pytest

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.sync.contacts import columnar
from antavo_ometria.sync.contacts.staged_files import write_customers
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria_tools.population import make_population

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def staged(tmp_path) -> Path:
    customers = [normalise_customer(c) for c in make_population(600)]
    customers[260]["score"] = "lots"  # a value of another kind than its format: the pandas path, in chunk two
    write_customers(tmp_path, [customers])
    return tmp_path / "customers.ndjson"


def mapping():
    return load_contact_mapping(PROJECT / "include" / "mappings")


def test_the_number_of_threads_comes_from_the_environment_or_the_cores(monkeypatch):
    monkeypatch.delenv(columnar.THREADS, raising=False)
    assert 1 <= columnar.transform_threads() <= 4
    monkeypatch.setenv(columnar.THREADS, "3")
    assert columnar.transform_threads() == 3
    for wrong in ("auto", "0", "-2", "1.5"):
        monkeypatch.setenv(columnar.THREADS, wrong)
        with pytest.raises(ValueError, match="ANTAVO_OMETRIA_TRANSFORM_THREADS must be a whole number"):
            columnar.transform_threads()


def _summary(path: Path, threads: int) -> list:
    chunks = list(columnar.prepared_chunks(path, mapping(), rows=250, threads=threads))
    return [(c.ids, c.encoded.to_pylist(), c.hashes.to_pylist(), sorted(c.gate.failures)) for c in chunks]


def _prepare_in_a_daemon(path: str, results) -> None:
    try:
        results.put(_summary(Path(path), threads=2))
    except BaseException as exc:  # noqa: BLE001  (reported to the test)
        results.put(repr(exc))


def test_in_a_daemon_process_as_under_celery_two_threads_prepare_the_same_chunks(staged):
    """A Celery pool process is a daemon, and so is the task Airflow forks from it: the transform's threads run
    in it, and give the chunks one thread gives (same ids, bodies, hashes and quarantined rows, in order)."""
    import billiard

    results = billiard.Queue()
    daemon = billiard.Process(target=_prepare_in_a_daemon, args=(str(staged), results), daemon=True)
    daemon.start()
    outcome = results.get(timeout=120)
    daemon.join(timeout=30)
    assert not isinstance(outcome, str), outcome
    assert [len(ids) for ids, *_ in outcome] == [250, 250, 100]
    assert 10 in outcome[1][3]  # c00000260, held back in its chunk (with the population's malformed ones)
    assert outcome == _summary(staged, threads=1)


def test_a_failure_on_the_pandas_path_fails_the_step(staged, monkeypatch):
    original = columnar.transform

    def fails(columns, mapping_, *args):
        if "c00000260" in columns["id"].tolist():
            raise RuntimeError("broken chunk")
        return original(columns, mapping_, *args)

    monkeypatch.setattr(columnar, "transform", fails)
    with pytest.raises(RuntimeError, match="broken chunk"):
        list(columnar.prepared_chunks(staged, mapping(), rows=250, threads=2))
