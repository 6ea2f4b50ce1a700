"""The reliability table: every fault scenario of tests/scenarios.py, run for real; writes it into BENCHMARKS.md.

    make reliability
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.scenarios import SCENARIOS, run, run_bad_inputs

PROJECT = Path(__file__).resolve().parents[1]

HEADING = "## Reliability"


def main() -> None:
    started = time.time()
    rows = []
    for name in SCENARIOS:
        outcome = run(name)
        rows.append(outcome)
        print(f"{name}: runs {outcome.runs}, lost {outcome.lost}, stored twice {outcome.stored_twice}, "
              f"re-sent {outcome.resent}", flush=True)
    bad = run_bad_inputs()
    lines = [
        HEADING,
        "",
        f"Measured by `make reliability` (`python -m benchmarks.reliability`) on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
        f"in {time.time() - started:.0f} s. Each row runs the contact sync of the sandbox's population (2,500 "
        "customers, 3 Read API pages) and the reward-claim delivery as the DAGs do, each step tried again up to "
        "the DAGs' retries, against a sandbox that misbehaves; the rows below the first eleven span several runs "
        "with a fault that outlasts every retry. *Runs* is how each contact run and event delivery ended, in "
        "order (✓ success, ✗ failed, red in Airflow with the alert). The columns from *lost* on are counted per id "
        "from what the Ometria sandbox itself accepted: *lost*, expected there (with its latest values) and "
        "missing; *stored twice*, a custom event accepted again after Ometria had confirmed it, or one contact "
        "under two records; *held back*, poison records held with their reason out of those planted; *re-sent*, "
        "records accepted again with an identical payload (harmless for contacts, which Ometria upserts by id); "
        "*owed*, contacts the state store still owes Ometria at the end (rejected or not delivered); *removed from "
        "list*, members who left the programme and are no longer on the list, out of those who left.",
        "",
        "| fault injected | faults fired | runs | contacts delivered | events delivered | held back | lost "
        "| stored twice | re-sent | owed | removed from list |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    marks = {"success": "✓", "failed": "✗", "skipped": "skipped"}
    for o in rows:
        lines.append(f"| {o.scenario} | {o.faults_injected} | {' '.join(marks[r] for r in o.runs)} "
                     f"| {o.contacts_delivered:,} / {o.contacts_expected:,} | {o.events_delivered} / "
                     f"{o.events_expected} | {o.held} / {o.held_expected} | {o.lost} | {o.stored_twice} "
                     f"| {o.resent} | {o.owed} | {o.removed_from_list} / {o.leavers} |")
    lines += [
        "",
        "| bad input | customers | held back with the reason | delivered | lost |",
        "|---|---|---|---|---|",
    ]
    for name, held, delivered, lost in bad:
        lines.append(f"| {name} | {held + delivered} | {held} | {delivered} | {lost} |")
    lines.append("")
    lines.append("Re-sent rows: when Ometria answers after the client's timeout, the batch is pushed again (the answer "
                 "was lost); when the state store goes away for longer than the run, the last batch it could not "
                 "record is sent again by the next run. Also tested (`tests/test_load_recovery.py`, "
                 "`tests/test_deployment.py`, `tests/test_no_silent_loss.py`, `tests/test_events.py`): the load "
                 "process killed with SIGKILL halfway and resumed (by hand and by Airflow's retry) delivers every "
                 "contact once; an unreachable state store fails the run before anything is sent; a sensor whose "
                 "trigger errors fails in a real Airflow run instead of skipping.")
    target = PROJECT / "BENCHMARKS.md"
    text = target.read_text(encoding="utf-8") if target.exists() else "# Benchmarks\n"
    text = re.sub(rf"\n{HEADING}\n.*", "", text, flags=re.S).rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    target.write_text(text, encoding="utf-8")
    print(f"wrote the reliability table into {target}")


if __name__ == "__main__":
    main()
