"""Antavo request signing: a known-answer vector computed by hand, and the sandbox's verification."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest
import requests
from escherauth import EscherRequestsAuth

from antavo_ometria.antavo.client import ESCHER_OPTIONS, credential_scope

KEY, SECRET, ENV = "TESTKEY", "TESTSECRET", "st2"
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def hand_signature(method: str, path: str, query: str, host: str, date: str, body: bytes = b"") -> str:
    """ANTAVO-HMAC-SHA256 as Antavo documents it, written without the signing library."""
    canonical = "\n".join([
        method, path, query, f"date:{date}\nhost:{host}", "", "date;host", hashlib.sha256(body).hexdigest(),
    ])
    scope = f"{WHEN:%Y%m%d}/{ENV}/api/antavo_request"
    to_sign = "\n".join([
        "ANTAVO-HMAC-SHA256", f"{WHEN:%Y%m%dT%H%M%SZ}", scope, hashlib.sha256(canonical.encode()).hexdigest(),
    ])
    key = hmac.new(b"ANTAVO" + SECRET.encode(), f"{WHEN:%Y%m%d}".encode(), hashlib.sha256).digest()
    for part in (ENV, "api", "antavo_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def signed(url: str) -> requests.PreparedRequest:
    auth = EscherRequestsAuth(KEY, SECRET, credential_scope(ENV), {**ESCHER_OPTIONS, "current_time": WHEN})
    return auth(requests.Request("GET", url).prepare())


def test_signature_matches_an_independent_computation():
    request = signed("https://api.st2.antavo.com/customers/-/events?timestamp.gte=2025-01-01T00%3A00%3A00Z"
                     "&order=asc&limit=100")
    assert request.headers["Date"] == "Thu, 02 Jan 2025 03:04:05 GMT"
    expected = hand_signature(
        "GET", "/customers/-/events", "limit=100&order=asc&timestamp.gte=2025-01-01T00%3A00%3A00Z",
        "api.st2.antavo.com", "Thu, 02 Jan 2025 03:04:05 GMT",
    )
    assert request.headers["Authorization"] == (
        f"ANTAVO-HMAC-SHA256 Credential={KEY}/20250102/st2/api/antavo_request, "
        f"SignedHeaders=date;host, Signature={expected}"
    )


def test_known_answer_vector():
    # GET https://api.st2.antavo.com/customers/c1 with TESTKEY/TESTSECRET at 2025-01-02T03:04:05Z
    vector = "e7f5f47bff7c1bc67f0640421704368927fc50fe00e5ef0c5f39dacd42e2c0e6"
    assert hand_signature("GET", "/customers/c1", "", "api.st2.antavo.com", "Thu, 02 Jan 2025 03:04:05 GMT") == vector
    assert signed("https://api.st2.antavo.com/customers/c1").headers["Authorization"].endswith(f"Signature={vector}")


def test_sandbox_accepts_signed_requests(antavo_client):
    pages = list(antavo_client.iter_customer_pages())
    assert sum(len(p) for p in pages) == 300


@pytest.mark.parametrize("secret, when, why", [
    ("wrong-secret", None, "signature"),
    ("sandbox-secret", datetime(2020, 1, 1, tzinfo=UTC), "date"),
])
def test_sandbox_rejects_bad_or_stale_signatures(sandbox, secret, when, why):
    from antavo_ometria_tools.sandbox import ANTAVO_ENVIRONMENT, ANTAVO_KEY

    options = {**ESCHER_OPTIONS, **({"current_time": when} if when else {})}
    auth = EscherRequestsAuth(ANTAVO_KEY, secret, credential_scope(ANTAVO_ENVIRONMENT), options)
    response = requests.get(f"{sandbox.antavo_url}/v1/customers?limit=1", auth=auth, timeout=5)
    assert response.status_code == 401
    assert why in response.json()["error"]["message"].lower()


def test_sandbox_rejects_unsigned_requests(sandbox):
    response = requests.get(f"{sandbox.antavo_url}/v1/customers?limit=1", timeout=5)
    assert response.status_code == 401
