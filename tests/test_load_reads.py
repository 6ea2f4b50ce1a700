"""The load reads the staged contacts a batch at a time and sends exactly what reading them whole would send: the
rows asked for, in the order asked; the same choice of what to send, hold and defer; a capped run, and a capped
load killed halfway, across several read batches and row groups."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_load_recovery import load_killed_at_third_push
from test_owed import DAG, HOUR, hours

from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
from antavo_ometria.ometria.contract import MAX_RECORD_BYTES as LIMIT
from antavo_ometria.sync.contacts.extract import extract
from antavo_ometria.sync.contacts.load import load_staged, select
from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.staged_files import (
    CONTACTS,
    CONTACTS_SCHEMA,
    DEFERRED,
    StagedIndex,
    contact_index,
    contacts_at,
    read_contacts,
    read_journal,
    read_ndjson,
)
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria_tools.sandbox import OMETRIA_KEY

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(state_url):
    store = StateStore(state_url)
    store.migrate()
    return store


def staged_file(folder: Path, rows: list[tuple[str, bytes, str]], group: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ids, bodies, hashes = (list(column) for column in zip(*rows))
    table = pa.table({"id": ids, "body": bodies, "hash": hashes}, schema=CONTACTS_SCHEMA)
    pq.write_table(table, folder / CONTACTS, row_group_size=group)


def test_the_rows_asked_for_are_read_in_the_order_asked_a_read_batch_at_a_time(tmp_path):
    rows = [(f"c{n:03d}", json.dumps({"id": f"c{n:03d}", "n": "é" * n}).encode(), f"h{n}") for n in range(50)]
    staged_file(tmp_path, rows, group=7)
    assert pq.ParquetFile(tmp_path / CONTACTS).num_row_groups == 8
    index = contact_index(tmp_path, rows=5)
    assert index.ids.to_pylist() == [i for i, _, _ in rows] and index.hashes.to_pylist() == [h for _, _, h in rows]
    assert index.sizes.tolist() == [len(body) for _, body, _ in rows]
    for positions in ([3, 17, 40, 0, 1, 2, 20, 21, 49], [49], [44, 45, 46, 47, 48], list(range(50)), []):
        reads = list(contacts_at(tmp_path, np.array(positions, np.int64), rows=5))
        assert [row for read in reads for row in read] == [rows[p] for p in positions]
        assert all(0 < len(read) <= 5 for read in reads)


def old_select(contacts, delivered, owed, cap):
    """What the load chose when it read every staged contact at once (the release before): the oracle."""
    pending = [(i, b, h) for i, b, h in contacts if (i, h) not in delivered]
    fits = [(i, b, h) for i, b, h in pending if len(b) <= LIMIT]
    oversized = [(i, len(b)) for i, b, _ in pending if len(b) > LIMIT]
    if cap:
        fits = sorted(fits, key=lambda fit: fit[0] not in owed)
        room = max(cap - (len(contacts) - len(pending)), 0)
        return [i for i, _, _ in fits[:room]], oversized, [(i, h) for i, _, h in fits[room:]]
    return [i for i, _, _ in fits], oversized, []


@pytest.mark.parametrize("seed", range(40))
def test_the_choice_of_what_to_send_is_the_one_made_over_every_body(seed):
    rng = random.Random(seed)
    contacts = [(f"c{n:04d}", b"x" * rng.choice([10, 900, LIMIT, LIMIT + 1]), f"h{rng.randrange(2)}")
                for n in range(rng.randrange(0, 300))]
    delivered = {(i, h) for i, _, h in contacts if rng.random() < 0.3} | {("c9999", "h0")}
    delivered |= {(i, "h1" if h == "h0" else "h0") for i, _, h in contacts if rng.random() < 0.1}  # other payloads
    owed = {i for i, _, _ in contacts if rng.random() < 0.2} | {"gone"}
    cap = rng.choice([0, 1, 50, 120, 1000])
    staged = StagedIndex(pa.array([i for i, _, _ in contacts], pa.string()),
                         pa.array([h for _, _, h in contacts], pa.string()),
                         np.array([len(b) for _, b, _ in contacts], np.int64))
    chosen = select(staged, delivered, owed, cap)
    send, oversized, deferred = old_select(contacts, delivered, owed, cap)
    assert [contacts[p][0] for p in chosen.send] == send
    assert [(o.id, o.size) for o in chosen.oversized] == oversized
    assert chosen.deferred == deferred
    assert chosen.delivered_earlier == sum((i, h) in delivered for i, _, h in contacts)


def capped(mappings: Path, cap: int) -> None:
    settings = mappings / "settings.toml"
    settings.write_text(settings.read_text().replace("max_contacts_per_run = 0 ", f"max_contacts_per_run = {cap}"))


def run(store, antavo, ometria, staging, run_id, interval, mappings):
    """Plan, extract, transform (row groups of 40), load (read 32 at a time), and the run marked done."""
    mapping = load_contact_mapping(mappings)
    plan = plan_run(store, mapping, DAG, run_id, interval)
    extract(antavo, staging, plan, paths=mapping.loyalty_fields)
    transform_staged(staging, mapping, plan, store, rows=40)
    assert pq.ParquetFile(staging / CONTACTS).num_row_groups > 1
    loaded = load_staged(staging, ometria, plan, store, rows=32)
    store.runs.finish(DAG, run_id, "success")
    return loaded


def test_a_capped_run_sends_the_owed_first_though_the_staged_file_lists_them_last(
        store, sandbox, antavo_client, ometria_client, tmp_path, mappings):
    capped(mappings, 100)
    first = run(store, antavo_client, ometria_client, tmp_path / "first", "first", (None, HOUR), mappings)
    assert (first.accepted, first.deferred) == (100, 190)
    owed = set(store.contacts.owed_ids())
    delivered = {i for _, i in sandbox.ometria.contacts}
    assert len(owed) == 190 and not owed & delivered
    touched = sorted(delivered)[:20]  # delivered, then changed again: new in the next run, not owed
    for customer_id in touched:
        sandbox.antavo.touch(customer_id, {"first_name": "Again"}, at=HOUR + timedelta(minutes=30))

    second = run(store, antavo_client, ometria_client, tmp_path / "second", "second", hours(0), mappings)
    staged = [i for i, _, _ in read_contacts(tmp_path / "second")]
    assert set(staged) == owed | set(touched)
    assert max(staged.index(i) for i in touched) < min(staged.index(i) for i in owed)  # read before any owed one
    assert (second.accepted, second.deferred, second.retried, second.retried_accepted) == (100, 110, 190, 100)
    received = sandbox.ometria.received
    assert all(received[("contact", i)] == 1 for i in touched)  # not sent again: deferred behind the owed
    assert sorted(received[("contact", i)] for i in owed) == [0] * 90 + [1] * 100
    assert {d["id"] for d in read_ndjson(tmp_path / "second" / DEFERRED)} == (owed | set(touched)) - {
        i for i in owed if received[("contact", i)]}
    assert store.contacts.owed_count() == 110


def test_a_capped_load_killed_halfway_resumes_within_the_cap_and_records_what_the_store_missed(
        store, sandbox, antavo_client, state_url, tmp_path):
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, DAG, "run-1")
    plan = replace(plan, settings={**plan.settings, "max_contacts_per_run": 250})
    staging = tmp_path / "staging"
    extract(antavo_client, staging, plan)
    assert transform_staged(staging, mapping, plan, store, rows=40).changed == 290
    elsewhere = StateStore(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # the first try's records never reach `store`
    elsewhere.migrate()
    load_killed_at_third_push(sandbox, staging, f"sqlite:///{tmp_path / 'elsewhere.db'}", plan)
    assert [len(e["ids"]) for e in read_journal(staging)] == [100, 100] and store.contacts.known_count() == 0

    client = OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.ometria_url, requests_per_second=0))
    loaded = load_staged(staging, client, plan, store, rows=32)
    assert (loaded.sent, loaded.accepted, loaded.delivered_earlier, loaded.deferred) == (250, 250, 200, 40)
    assert len(sandbox.ometria.contacts) == 250 and set(sandbox.ometria.received.values()) == {1}
    bodies = {i: (json.loads(body), h) for i, body, h in read_contacts(staging)}
    delivered = {i for _, i in sandbox.ometria.contacts}
    for customer_id in delivered:  # accepted, with the payload Ometria holds (for the trace)
        kept = store.contacts.get(customer_id)
        assert (kept["payload"], kept["accepted_hash"]) == bodies[customer_id], customer_id
    deferred = {d["id"] for d in read_ndjson(staging / DEFERRED)}
    assert len(deferred) == 40 and not deferred & delivered and deferred | delivered == set(bodies)
    assert store.contacts.known_count() == 250 and store.contacts.owed_count() == 40
