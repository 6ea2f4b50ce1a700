"""The connection check, before any data moves (Antavo's own module calls it "Connect").

A signed request to each Antavo API the sync reads, an authenticated Ometria call, and the configured
Ometria list looked up by its ID. `make check` prints one line per check; the first task of each DAG
runs the same checks and fails at once when credentials are refused or the list does not exist.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from antavo_ometria.antavo.client import AntavoClient
from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.transport import ApiError, AuthenticationFailed


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    retryable: bool = False  # a failure that trying again later could mend (the network, a 5xx)
    refused: bool = False  # the service refused the credentials: only changing them helps


class ConnectionCheckFailed(Exception):
    """At least one check failed; `retryable` is false when a retry cannot help (refused credentials, no list)."""

    def __init__(self, checks: list[Check]):
        self.checks = checks
        failed = [c for c in checks if not c.ok]
        self.retryable = all(c.retryable for c in failed)
        super().__init__("; ".join(f"{c.name}: {c.detail}" for c in failed))


REFUSED = {"Antavo": "the credentials were refused", "Ometria": "the API key was refused"}


def check_connections(antavo: AntavoClient, ometria: OmetriaClient, list_id: str,
                      fixes: Mapping[str, str] | None = None) -> list[Check]:
    """Every check, in order; a check that cannot run because an earlier one failed is reported as such.
    `fixes` says, per service, what to change when it refuses the credentials (the caller knows where they are
    set: the Airflow layer names the connection and its field)."""
    fixes = fixes or {}
    hosts = f"{urlsplit(antavo.read_api).netloc} and {urlsplit(antavo.base).netloc}"
    checks = [_attempt("Antavo", lambda: (antavo.ping(), f"signed requests accepted by {hosts}")[1], fixes)]
    lists: list[dict] = []

    def read_lists() -> str:
        lists.extend(ometria.lists())
        return f"API key accepted by {urlsplit(ometria.base).netloc} ({len(lists)} active list(s))"

    checks.append(_attempt("Ometria", read_lists, fixes))
    ometria_check = checks[-1]
    if ometria_check.refused:
        checks.append(Check("list", False, "not checked: Ometria refused the key"))
    elif not ometria_check.ok:
        checks.append(Check("list", False, "not checked: Ometria did not answer", ometria_check.retryable))
    else:
        checks.append(_list_check(list_id, lists))
    return checks


def _attempt(name: str, probe: Callable[[], str], fixes: Mapping[str, str]) -> Check:
    try:
        return Check(name, True, probe())
    except AuthenticationFailed as exc:
        fix = f"; {fixes[name]}" if name in fixes else ""
        return Check(name, False, f"{REFUSED[name]} ({exc}){fix}", refused=True)  # no retry: they stay refused
    except ApiError as exc:
        return Check(name, False, str(exc), exc.retryable)


def _list_check(list_id: str, lists: list[dict]) -> Check:
    if not list_id:
        return Check("list", True, "no list configured (settings.toml [ometria] list_id): contacts join no list")
    by_id = {str(row.get("id")): row for row in lists}
    found = by_id.get(str(list_id))
    if found is not None:
        note = "" if found.get("type") != "DYNAMIC" else (
            "; it is a DYNAMIC list, which Ometria fills by its own rules: contacts may not stay in it")
        return Check("list", True, f"{list_id} '{found.get('title')}' ({found.get('type')}, {found.get('status')})"
                                   f"{note}")
    # only a list that is not DYNAMIC keeps the contacts the sync adds: Ometria fills a DYNAMIC one by its rules
    addable = {i: row for i, row in by_id.items() if row.get("type") != "DYNAMIC"}
    close = difflib.get_close_matches(str(list_id), list(addable), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]} '{addable[close[0]].get('title')}'?" if close else ""
    known = ", ".join(f"{i} '{row.get('title')}'" for i, row in list(addable.items())[:10])
    left_out = len(by_id) - len(addable)
    dynamic = f"; {left_out} DYNAMIC list(s) left out: Ometria fills them by their rules" if left_out else ""
    return Check("list", False, f"list {list_id} is not among this account's active lists{hint} "
                                f"(lists a contact can be added to, by ID and name: {known or 'none'}{dynamic})")
