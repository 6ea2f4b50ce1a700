"""The transform step's outputs, byte for byte: every contact body and every quarantine line, for a population
with every kind of defect, in both payload modes, on one DuckDB thread and on two.

The expected files in tests/golden/ were written by the pandas engine, before the columnar pass; they were
written again once, when the columnar pass came, for one quarantine line: a score of 2**63, which pyarrow's
reader had turned into the float 9.223372036854776e+18, is now reported as the integer Antavo sent (every contact
body, every quarantined customer and every reason stayed the same). `python -m tests.test_engine_golden` writes
them again (only when an output is meant to change).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.staged_files import CONTACTS, QUARANTINE, read_contacts, write_customers
from antavo_ometria.sync.contacts.step_results import Plan
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria_tools.population import make_population

GOLDEN = Path(__file__).resolve().parent / "golden"
# copies of the shipped mapping tables the golden outputs were written with: the shipped ones may change
MAPPINGS = {mode: GOLDEN / "mappings" / mode for mode in ("legacy", "v2")}


def population() -> list[dict]:
    """1,200 synthetic customers (about 2.8 % malformed) and the values that take the engine's slow paths."""
    customers = [normalise_customer(c) for c in make_population(1200)]
    odd = {
        5: {"score": "lots"},  # text where numbers are: pyarrow refuses the chunk, it is read line by line
        17: {"first_name": "Tab\there"},  # control characters
        18: {"score": 1e30},  # a number JSON cannot carry exactly
        19: {"last_name": ["a", "list"]},  # a list where text belongs
        20: {"gender": "Other"},  # an unknown gender: left out
        21: {"birth_date": 1700000000},  # a unix time where a date belongs
        22: {"email": "  Spaced.Out@Example.com "},
        23: {"first_name": {"en": "Translated", "de": "Übersetzt"}},
        24: {"properties": {"newsletter": "perhaps", "favourite_store": None}},
        25: {"first_name": "\u00a0"},  # a blank that is no ASCII space
        601: {"score": 2**63},
        602: {"id": None},
        603: {"id": "c00000604"},  # the same id twice
    }
    for row, changes in odd.items():
        customers[row].update(changes)
    return customers


def plan(mapping) -> Plan:
    return Plan("golden", "golden", "golden", "full", "golden", None, True, False, mapping.version, None,
                "2026-12-01T00:00:00+00:00", None)


def outputs(staging: Path, mode: str, **engine) -> list[str]:
    """The contacts (id, body) and quarantine lines that the transform step writes, in order."""
    mapping = load_contact_mapping(MAPPINGS[mode])
    transform_staged(staging, mapping, plan(mapping), **engine)
    contacts = [f"C\t{i}\t{body.decode()}" for i, body, _ in read_contacts(staging)]
    held = [f"Q\t{line}" for line in (staging / QUARANTINE).read_text(encoding="utf-8").splitlines()]
    (staging / CONTACTS).unlink()
    return contacts + held


def stage(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_customers(folder, [population()])
    return folder


def expected(mode: str) -> list[str]:
    return gzip.decompress((GOLDEN / f"{mode}.txt.gz").read_bytes()).decode().splitlines()


@pytest.mark.parametrize("mode", MAPPINGS)
def test_outputs_are_byte_for_byte_the_golden_ones(mode, tmp_path):
    staging = stage(tmp_path)
    golden = expected(mode)
    assert any(line.startswith("Q\t") for line in golden) and sum(line.startswith("C\t") for line in golden) > 1000
    assert outputs(staging, mode, threads=1, rows=250) == golden  # five chunks on one thread
    assert outputs(staging, mode, threads=2, rows=250) == golden  # the same five on two threads


def write() -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for mode in MAPPINGS:
        staging = stage(Path(tempfile.mkdtemp()))
        lines = outputs(staging, mode, threads=1, rows=250)
        (GOLDEN / f"{mode}.txt.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
        shutil.rmtree(staging)
        print(f"{mode}: {sum(x.startswith('C') for x in lines)} contacts, {sum(x.startswith('Q') for x in lines)} held")


if __name__ == "__main__":
    write()
