"""Both API clients against the sandbox over real sockets: paging, shapes, retries, batching, limits."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import requests
from stack import free_port

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.ometria.contract import MAX_RECORD_BYTES
from antavo_ometria.ometria.payload import encode_record
from antavo_ometria.ometria.push import batches, split_oversized
from antavo_ometria.transport import ApiError, RateLimiter


def contact(i: int, **extra) -> dict:
    return {"@type": "contact", "@collection": "antavo", "id": f"c{i}", "email": f"p{i}@example.com", **extra}


# -- transport ---------------------------------------------------------------------------------
def test_rate_limiter_spaces_requests():
    limiter = RateLimiter(rate=50)
    start = time.monotonic()
    for _ in range(11):
        limiter.acquire()
    assert time.monotonic() - start >= 10 / 50 * 0.9  # the first token is free, ten more cost 0.2 s


def test_rate_limiter_pause_holds_every_caller():
    limiter = RateLimiter(rate=100)
    limiter.acquire()
    limiter.pause(0.3)
    start = time.monotonic()
    limiter.acquire()
    assert time.monotonic() - start >= 0.25


# -- Antavo ------------------------------------------------------------------------------------
def test_full_load_pages_through_the_read_api(antavo_client, sandbox):
    pages = list(antavo_client.iter_customer_pages())
    ids = [c["id"] for page in pages for c in page]
    assert ids == [c["_id"] for c in sandbox.antavo.customers]
    assert antavo_client.requests_made == 1  # 300 customers fit one page of 1000


def test_full_load_uses_pages_of_1000(sandbox, antavo_client):
    from antavo_ometria_tools.population import make_population

    sandbox.antavo.customers = make_population(2100)
    pages = list(antavo_client.iter_customer_pages())
    assert [len(p) for p in pages] == [1000, 980, 120]  # each page re-reads 20 and drops those it had
    assert sorted(c["id"] for p in pages for c in p) == sorted(c["_id"] for c in sandbox.antavo.customers)
    # pages are read ahead once one came back full: up to `concurrency - 1` requests past the end find nothing
    assert 3 <= sandbox.antavo.requests <= 3 + antavo_client.config.concurrency - 1


def test_a_customer_leaving_the_list_while_it_is_read_skips_no_one(sandbox, antavo_client):
    from antavo_ometria_tools.population import make_population

    sandbox.antavo.customers = make_population(2100)
    pages = antavo_client.iter_customer_pages()
    first = next(pages)
    sandbox.antavo.touch("c00000005", {"status": "inactive"})  # the offsets of every later customer shift by one
    rest = [c for page in pages for c in page]
    read = {c["id"] for c in first + rest}
    assert read == {c["_id"] for c in sandbox.antavo.customers}  # c00001000 included


def _changed_in(sandbox, since: datetime, until: datetime) -> list[str]:
    return sorted(c["_id"] for c in sandbox.antavo.customers
                  if since < datetime.fromisoformat(c["updated_at"]) < until)


def _post(url: str, body: dict) -> dict:
    return requests.post(url, json=body, timeout=5).json()


def test_customers_changing_while_the_change_list_is_paged_skip_no_one(sandbox, antavo_client):
    since, until = datetime(2026, 1, 15, tzinfo=UTC), datetime.now(UTC) - timedelta(minutes=1)
    listed = _changed_in(sandbox, since, until)
    assert len(listed) > 150  # two full classic pages and more
    moving = listed[:30]  # they change after the first page: everyone behind them moves 30 places forward
    _post(f"{sandbox.antavo_url}/_sandbox/change-during-search", {"customers": moving, "search": 1})
    change_list = antavo_client.read_change_list(since, until)
    read = Counter(change_list.ids)
    # per id: each customer still in the window is listed once; those that moved out are in the next window
    assert [i for i in listed if i not in moving and read[i] != 1] == []
    following = set(antavo_client.changed_customer_ids(until - timedelta(minutes=10)))
    assert [i for i in moving if i not in read and i not in following] == []
    assert change_list.suspect_missed and change_list.rereads == 1
    assert "read again 1 time(s)" in change_list.reason


def test_a_change_list_that_keeps_moving_fails_the_step_as_retryable(sandbox, antavo_client):
    from antavo_ometria.antavo.client import SHIFT_REREADS, ListShifted

    since, until = datetime(2026, 1, 15, tzinfo=UTC), datetime.now(UTC) - timedelta(minutes=1)
    listed = _changed_in(sandbox, since, until)
    for read in range(SHIFT_REREADS + 1):  # a bulk job in Antavo keeps changing customers
        sandbox.antavo.change_during_search(listed[30 * read: 30 * read + 30], search=read + 1)
    with pytest.raises(ListShifted, match="kept moving") as raised:
        antavo_client.read_change_list(since, until)
    assert raised.value.retryable


def test_a_quiet_change_list_is_not_suspect(sandbox, antavo_client):
    change_list = antavo_client.read_change_list(datetime(2026, 1, 15, tzinfo=UTC))
    assert len(change_list.ids) > 100 and not change_list.suspect_missed and change_list.reason == ""


def test_classic_and_read_api_shapes_normalise_to_one(antavo_client, sandbox):
    since = datetime(2026, 1, 15, tzinfo=UTC)
    ids = antavo_client.changed_customer_ids(since)
    expected = [c["_id"] for c in sandbox.antavo.customers if datetime.fromisoformat(c["updated_at"]) > since]
    assert sorted(ids) == sorted(expected) and len(ids) > 100  # more than one classic page
    classic = antavo_client.get_customers(ids[:20])
    for customer in classic:
        read_api = normalise_customer(sandbox.antavo.by_id[customer["id"]])
        assert customer["tiers"] == read_api["tiers"]
        assert customer["accounts"] == read_api["accounts"]
        assert customer["updated_at"] == read_api["updated_at"]
        assert customer["handler"] == read_api["handler"]
        assert customer["status"] == "active"


def test_error_inside_a_200_is_a_failure_and_is_retried(antavo_client, sandbox):
    sandbox.antavo.faults.add({"status": 200, "body": {"error": {"type": "InternalError", "code": 1,
                                                                  "message": "temporarily unavailable"}},
                               "path": "/v1/customers", "count": 2})
    pages = list(antavo_client.iter_customer_pages())
    assert sum(map(len, pages)) == 300
    assert sandbox.antavo.faults.injected == 2


def test_error_inside_a_200_that_is_not_resendable_stops(antavo_client, sandbox):
    sandbox.antavo.faults.add({"status": 200, "body": {"error": {"message": "bad filter", "code": 7,
                                                                  "resendable": False}}, "count": 1})
    with pytest.raises(ApiError, match="bad filter"):
        list(antavo_client.iter_customer_pages())


@pytest.mark.parametrize("fault", [{"status": 429}, {"status": 503}, {"drop": True}, {"status": 429, "retry_after": "0"}])
def test_antavo_retries_transient_failures(antavo_client, sandbox, fault):
    sandbox.antavo.faults.add({**fault, "count": 2})
    assert sum(map(len, antavo_client.iter_customer_pages())) == 300


def test_antavo_gives_up_after_the_last_attempt(antavo_client, sandbox):
    sandbox.antavo.faults.add({"status": 503, "count": 10})
    with pytest.raises(ApiError, match="gave up after 4 attempts") as raised:
        list(antavo_client.iter_customer_pages())
    assert raised.value.retryable


def test_events_feed_by_time_window(antavo_client, sandbox):
    inside = datetime(2026, 3, 1, 12, tzinfo=UTC)
    sandbox.antavo.claim_reward("c00000001", "rw-10off", at=inside)
    sandbox.antavo.claim_reward("c00000002", "rw-coffee", at=datetime(2026, 3, 2, tzinfo=UTC))
    events = [e for page in antavo_client.iter_events(datetime(2026, 3, 1, tzinfo=UTC),
                                                      datetime(2026, 3, 2, tzinfo=UTC)) for e in page]
    assert [(e["customer_id"], e["action"], e["properties"]["reward"]) for e in events] == [
        ("c00000001", "reward", "rw-10off")]
    rewards = antavo_client.get_claimed_rewards("c00000001")
    assert rewards[0]["title"] == "£10 off your next order"


# -- Ometria -----------------------------------------------------------------------------------
def test_batches_hold_at_most_100_records():
    sizes = [len(ids) for ids, _ in batches((str(i), b"{}") for i in range(250))]
    assert sizes == [100, 100, 50]


def test_records_over_60_kb_are_refused_locally_with_a_reason():
    small, big = encode_record(contact(1)), encode_record(contact(2, note="x" * MAX_RECORD_BYTES))
    fits, refused = split_oversized([("c1", small), ("c2", big)])
    assert [i for i, _ in fits] == ["c1"]
    assert refused[0].id == "c2" and f"at most {MAX_RECORD_BYTES}" in refused[0].reason


def test_the_60_kb_limit_is_read_as_60000_bytes_so_that_a_record_fits_either_reading():
    # Ometria's documentation says "60KB" without saying which kilobyte: the smaller reading is the safe one
    empty = len(encode_record(contact(1, note="")))
    exact = encode_record(contact(1, note="x" * (60_000 - empty)))
    over = encode_record(contact(2, note="x" * (60_001 - empty)))
    assert (len(exact), len(over)) == (60_000, 60_001)
    fits, refused = split_oversized([("c1", exact), ("c2", over)])
    assert [i for i, _ in fits] == ["c1"] and [r.id for r in refused] == ["c2"]
    assert refused[0].reason == "record is 60001 bytes; Ometria accepts at most 60000"


def test_push_keeps_ometria_answer(ometria_client, sandbox):
    result = push(ometria_client, [contact(i) for i in range(100)])
    assert (result.status, result.accepted, result.rejected) == ("OK", 100, 0)
    assert len(result.request_id) == 36
    assert len(sandbox.ometria.contacts) == 100


def push(client, records: list[dict]):
    return client.push_encoded("contact", [encode_record(r) for r in records])


def test_push_refuses_an_unknown_record_type_or_too_many_records_before_sending(ometria_client, sandbox):
    with pytest.raises(ValueError, match="record type"):
        ometria_client.push_encoded("purchase", [encode_record(contact(1))])
    with pytest.raises(ValueError, match="1..100 records"):
        ometria_client.push_encoded("contact", [encode_record(contact(i)) for i in range(101)])
    assert sandbox.ometria.pushes == 0


def test_sandbox_enforces_the_request_contract(sandbox):
    from antavo_ometria_tools.sandbox import OMETRIA_KEY

    def post(body, key=OMETRIA_KEY):
        return requests.post(f"{sandbox.ometria_url}/v2/push", data=json.dumps(body),
                             headers={"X-Ometria-Auth": key, "Content-Type": "application/json"}, timeout=5)

    assert post([contact(i) for i in range(101)]).status_code == 400
    assert post(contact(1)).status_code == 400  # not an array
    assert post([contact(1), {"@type": "order", "id": "o1"}]).status_code == 400
    assert post([contact(1)], key="wrong").status_code == 403
    answer = post([contact(1), contact(2, gender="male"), contact(3, properties={"nope": 1})]).json()
    assert (answer["accepted"], answer["rejected"]) == (1, 2)
    errors = requests.get(f"{sandbox.ometria_url}/v2/push/_errors", headers={"X-Ometria-Auth": OMETRIA_KEY},
                          timeout=5).json()
    assert {"error_message": "not a valid value", "error_path": "root > gender"} in errors
    assert {"error_message": "unknown custom field", "error_path": "root > properties > nope"} in errors


def test_push_errors_and_lists(ometria_client, sandbox):
    push(ometria_client, [contact(1, country_id="UK")])
    assert ometria_client.push_errors() == [{"error_message": "not a valid value", "error_path": "root > country_id"}]
    assert {row["id"] for row in ometria_client.lists()} == {"8400", "8401"}


@pytest.mark.parametrize("fault", [
    {"status": 429}, {"status": 429, "retry_after": "1"}, {"status": 502}, {"drop": True}, {"delay": 2.5},
])
def test_ometria_retries_transient_failures_without_losing_records(ometria_client, sandbox, fault):
    sandbox.ometria.faults.add({**fault, "path": "/v2/push", "count": 1})
    result = push(ometria_client, [contact(i) for i in range(10)])
    assert result.accepted == 10
    assert len(sandbox.ometria.contacts) == 10


def test_ometria_permanent_error_is_not_retried(ometria_client, sandbox):
    sandbox.ometria.faults.add({"status": 400, "path": "/v2/push", "count": 5})
    with pytest.raises(ApiError) as raised:
        push(ometria_client, [contact(1)])
    assert not raised.value.retryable
    assert sandbox.ometria.faults.injected == 1


def test_client_rate_limit_keeps_under_the_server_limit(sandbox):
    from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
    from antavo_ometria_tools.sandbox import OMETRIA_KEY

    sandbox.ometria.rate = 10
    client = OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.ometria_url, requests_per_second=8))
    for i in range(20):
        push(client, [contact(i)])
    assert sandbox.ometria.throttled == 0
    assert len(sandbox.ometria.contacts) == 20


def test_secrets_are_not_in_reprs():
    from antavo_ometria.antavo.client import AntavoConfig
    from antavo_ometria.ometria.client import OmetriaConfig

    assert "s3cret" not in repr(AntavoConfig("https://api.x.antavo.com", "key", "s3cret", "x"))
    assert "s3cret" not in repr(OmetriaConfig("s3cret"))


def test_connection_flags_typed_as_text():
    from antavo_ometria.airflow.hooks import _flag

    assert [_flag(v) for v in (True, False, "false", "False", "no", "0", "true", "yes", 1)] == [
        True, False, False, False, False, False, True, True, True]


def test_state_store_url_from_a_connection():
    from types import SimpleNamespace

    from airflow.models.connection import Connection

    from antavo_ometria.airflow.hooks import state_store_url

    postgres = Connection(conn_id="s", conn_type="postgres", login="sync", password="p@ss word", host="db",
                          port=5432, schema="sync")
    assert state_store_url(lambda _: postgres, "s") == "postgresql+psycopg://sync:p%40ss word@db:5432/sync"
    bare = Connection(conn_id="s", conn_type="postgres", login="sync", host="db")  # no port, no database
    assert state_store_url(lambda _: bare, "s") == "postgresql+psycopg://sync@db/postgres"
    generic = SimpleNamespace(conn_id="s", conn_type="generic", extra_dejson={"url": "sqlite:////tmp/x.db"})
    assert state_store_url(lambda _: generic, "s") == "sqlite:////tmp/x.db"


def test_incremental_profile_reads_ask_for_the_expiring_points_the_mapping_needs(antavo_client, sandbox):
    expected = sandbox.antavo.by_id["c00000001"]["extensions"]["expiring_points"]["total"]
    (plain,) = antavo_client.get_customers(["c00000001"])
    (asked,) = antavo_client.get_customers(["c00000001"], ["email", "extensions.expiring_points.total"])
    assert "extensions" not in plain  # a classic profile leaves them out unless asked
    assert asked["extensions"]["expiring_points"]["total"] == expected


def test_pages_read_ahead_recover_from_a_page_that_came_back_short(antavo_client):
    """A page shorter than the limit while more are announced (the list shrank): the pages guessed beyond it
    are dropped and reading goes on from its real offset, skipping no one."""
    listing = list(range(1000))
    asked = []

    def fetch(offset: int) -> list:
        asked.append(offset)
        if offset == 160:  # the third page comes back short, yet announces more
            return [("page", offset, listing[offset: offset + 50])]
        return [("page", offset, listing[offset: offset + 100])]

    def size(body):
        return len(body[0][2])

    def more(body):  # a full page, or the short one that announces more anyway
        return size(body) == 100 or body[0][1] == 160

    seen = [x for body in antavo_client._overlapping_pages(fetch, 100, size, more) for x in body[0][2]]
    assert set(seen) == set(range(1000))
    assert asked[:2] == [0, 80] and 160 in asked and 190 in asked  # 160 + 50 - 20: read again from where it ended
    assert all(o % 80 == 0 or (o - 190) % 80 == 0 for o in asked), asked  # full pages' grid, before and after
    assert len(asked) <= 1000 // 80 + 2 + 2 * antavo_client.config.concurrency


def test_a_list_that_moved_more_than_the_overlap_is_read_again_not_skipped(sandbox, antavo_client):
    """More customers left the list between two pages than the pages overlap: some would be skipped, so the
    read fails (retryably) instead of going on."""
    from antavo_ometria_tools.population import make_population

    sandbox.antavo.customers = make_population(2100)
    pages = antavo_client.iter_customer_pages()
    next(pages)
    for i in range(100, 130):
        sandbox.antavo.touch(f"c{i:08d}", {"status": "inactive"})
    with pytest.raises(ApiError, match="moved by more than 20") as raised:
        list(pages)
    assert raised.value.retryable


def serve_each(server, handle) -> None:
    """Accept connections on `server` until it is closed, each handled by `handle(conn)` in a thread of its own."""
    import threading

    def loop():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


@pytest.fixture
def answering():
    """A server on loopback that reads each request and answers it as told: `close` closes the connection without an
    answer, `sleep` answers after the client's timeout, a number answers with that status. It counts the requests
    it read."""
    import socket

    plan, read = {"how": "200"}, []
    server = socket.create_server(("127.0.0.1", 0))

    def handle(conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            read.append(data.split(b"\r\n", 1)[0])
            if plan["how"] == "sleep":
                time.sleep(0.6)
            if plan["how"] not in ("close", "sleep"):
                conn.sendall(f"HTTP/1.1 {plan['how']} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())

    serve_each(server, handle)
    yield f"http://127.0.0.1:{server.getsockname()[1]}", plan, read
    server.close()


@pytest.mark.parametrize("how, lost", [("sleep", True), ("close", True), ("504", True), ("502", True),
                                       ("503", False), ("refused", False)])
def test_a_request_whose_repeat_is_not_known_to_be_harmless_is_not_sent_again_once_it_may_have_been_read(
        answering, how, lost):
    """A custom event push, over real sockets: once the server may have read it (its answer timed out, the
    connection closed before an answer, a gateway's 502 or 504), it is not sent again in that call (AnswerLost);
    a connection that never opened, or a 503, is retried as any other push."""
    from antavo_ometria.transport import AnswerLost, RetryPolicy, request_with_retries

    url, plan, read = answering
    plan["how"] = how
    if how == "refused":
        url = f"http://127.0.0.1:{free_port()}"
    tries = []

    def send() -> requests.Response:
        tries.append(1)
        return requests.post(url, data=b"[]", headers={"Connection": "close"}, timeout=(1, 0.3))

    policy = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.002)
    with pytest.raises(AnswerLost if lost else ApiError) as raised:
        request_with_retries(send, what="POST /v2/push", policy=policy, limiter=RateLimiter(0), resend_unanswered=False)
    assert (type(raised.value) is AnswerLost) == lost and raised.value.retryable != lost
    assert len(tries) == (1 if lost else 3)
    assert len(read) == (0 if how == "refused" else len(tries))  # what the server actually read


def test_a_custom_event_push_after_a_contact_push_does_not_ride_the_contact_s_kept_alive_connection():
    """`Connection: close` only asks the server to close the connection after its answer: the push itself still
    takes an idle connection from the session's pool, such as the one the contact push (kept alive) just used. If
    Ometria closes that idle connection as the push arrives (a keep-alive timeout), the push was never read, yet
    it surfaces as a dropped connection: AnswerLost, a failed delivery and a back-off for an event Ometria never
    saw. A custom event should go out on a connection opened for it."""
    import select
    import socket

    from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
    from antavo_ometria.transport import RetryPolicy

    server = socket.create_server(("127.0.0.1", 0))
    read, connections = [], []
    ok = b'{"status":"OK","request_id":"r","accepted":1,"rejected":0}'

    def answer(conn) -> None:
        conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(ok)).encode() + b"\r\n\r\n" + ok)

    def read_request(conn) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        return head

    def handle(conn, first: bool) -> None:
        with conn:
            if read_request(conn):
                read.append(1)
                answer(conn)  # kept alive
                if first:  # the idle connection closes just as the next request arrives on it
                    select.select([conn], [], [], 5)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def counted(conn) -> None:
        connections.append(conn)
        handle(conn, len(connections) == 1)

    serve_each(server, counted)
    try:
        client = OmetriaClient(OmetriaConfig("key", f"http://127.0.0.1:{server.getsockname()[1]}",
                                             requests_per_second=0, timeout=2,
                                             retry=RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.002)))
        client.push_encoded("contact", [b'{"@type":"contact","id":"c1"}'])
        result = client.push_encoded("custom_event", [b'{"@type":"custom_event","id":"r:e1"}'])
        assert result.accepted == 1
        assert len(read) == 2 and len(connections) == 2  # the custom event on a connection of its own
    finally:
        server.close()


def test_a_custom_event_push_through_a_proxy_that_refuses_the_connection_is_retried_not_reported_lost():
    """Behind an outbound proxy (HTTPS_PROXY, common on Airflow workers), a proxy that is down makes requests raise
    ProxyError(MaxRetryError(reason=urllib3 ProxyError('Unable to connect to proxy', NewConnectionError))): the
    request never left the machine, as with a refused connection, yet it is reported as an answer Ometria may have
    stored (AnswerLost), failing the delivery instead of being retried."""
    from stack import free_port

    from antavo_ometria.transport import RetryPolicy, request_with_retries

    tries = []

    def send() -> requests.Response:
        tries.append(1)
        proxy = f"http://127.0.0.1:{free_port()}"
        return requests.post("http://ometria.invalid/v2/push", data=b"[]", timeout=(1, 0.3),
                             proxies={"http": proxy, "https": proxy})

    with pytest.raises(ApiError) as raised:
        request_with_retries(send, what="POST /v2/push", policy=RetryPolicy(attempts=3, backoff=0.001,
                                                                            max_backoff=0.002),
                             limiter=RateLimiter(0), resend_unanswered=False)
    assert type(raised.value) is ApiError and raised.value.retryable
    assert len(tries) == 3


def test_a_custom_event_push_whose_tls_connection_breaks_after_the_server_read_it_is_not_sent_again(tmp_path):
    """SSLError is not only a failed handshake: urllib3 turns any ssl.SSLError into SSLError, also one raised while
    the answer is read (a corrupt or unexpected TLS record, a middlebox tearing the session down after the request
    went through). requests then raises SSLError(MaxRetryError(reason=SSLError)), the same shape as a refused
    certificate, and `_never_sent` takes it for a connection never made: the push is sent again although the server
    read (and may have stored) it."""
    import os
    import socket
    import ssl
    import subprocess

    from antavo_ometria.transport import AnswerLost, RetryPolicy, request_with_retries

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server, read = socket.create_server(("127.0.0.1", 0)), []

    def handle(raw) -> None:
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                data = b""
                while not data.endswith(b"\r\n\r\n[]"):
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                read.append(1)  # read in full: the server acts on it
                os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + b"\x01" * 32)  # a record that does not decrypt
                time.sleep(0.3)
        except (OSError, ssl.SSLError):
            pass

    serve_each(server, handle)
    url = f"https://127.0.0.1:{server.getsockname()[1]}/v2/push"
    tries = []

    def send() -> requests.Response:
        tries.append(1)
        return requests.post(url, data=b"[]", timeout=(1, 1), verify=False)

    try:
        with pytest.raises(ApiError) as raised:
            request_with_retries(send, what="POST /v2/push", policy=RetryPolicy(attempts=3, backoff=0.001,
                                                                                max_backoff=0.002),
                                 limiter=RateLimiter(0), resend_unanswered=False)
        assert len(read) == 1, f"the server read the push {len(read)} times ({type(raised.value).__name__})"
        assert type(raised.value) is AnswerLost
    finally:
        server.close()
