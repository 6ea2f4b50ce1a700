"""What the command line and the run report say on screen when something needs the user's attention."""

from __future__ import annotations

import subprocess
from pathlib import Path

from antavo_ometria.sync.report import format_report
from antavo_ometria_tools.cli import main

PROJECT = Path(__file__).resolve().parents[1]


def test_make_trace_without_an_id_prints_the_usage_line_not_a_traceback(capsys):
    assert main(["trace", ""]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("usage: make trace ID=<Antavo customer id or email>")
    assert "Traceback" not in err


def test_make_trace_without_an_id_through_make():
    done = subprocess.run(["make", "--no-print-directory", "-s", "trace"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "usage: make trace ID=<Antavo customer id or email>" in done.stderr
    assert "Traceback" not in done.stderr


def held_report(staging: str, kinds: dict[str, int]) -> dict:
    """A run report holding back `kinds` records of each kind, in the order the report lists them."""
    rows = [{"id": f"c{kind[0]}{n:07}", "reasons": [f"{kind} for a reason"]}
            for kind, count in kinds.items() for n in range(count)]
    counts = dict.fromkeys(("extracted", "unchanged", "changed", "sent", "batches", "accepted", "rejected",
                            "quarantined", "failed", "refused_oversized", "unaccounted"), 0)
    return {**counts, "status": "success", "mode": "full", "payload_mode": "legacy", "mapping_version": "abc",
            "quarantine_reasons": {}, "not_delivered": rows, "held_kinds": kinds, "async_errors": [],
            "staging": staging}


def test_the_records_not_listed_are_said_to_be_where_each_kind_is_kept():
    report = held_report("/staging/run-1", {"quarantined": 3, "oversized": 1, "rejected": 2, "failed": 1})
    lines = format_report(report, limit=2).splitlines()
    assert lines[-4:] == [
        "    … 1 more quarantined, in /staging/run-1/quarantine.ndjson",
        "    … 1 more over 60 KB, in /staging/run-1/oversized.ndjson",
        "    … 2 more rejected by Ometria, in the state store (sync_held_records, with their payloads)",
        "    … 1 more not delivered (the next run sends them), in the state store (sync_held_records)",
    ]


def test_rejected_records_are_not_said_to_be_in_the_quarantine_file():
    report = held_report("/staging/run-1", {"quarantined": 0, "oversized": 0, "rejected": 25, "failed": 0})
    text = format_report(report)
    assert "quarantine.ndjson" not in text
    assert text.splitlines()[-1] == ("    … 5 more rejected by Ometria, in the state store (sync_held_records, "
                                     "with their payloads)")
