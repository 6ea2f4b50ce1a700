"""The Antavo side of the sandbox: signed requests only, the documented envelopes, a synthetic population.

Control endpoints under `/_sandbox/` (unsigned) let tests change a customer or add events, and make
customers change while a client pages the `updated_at` search (`POST /_sandbox/change-during-search`).
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from urllib.parse import unquote

from escherauth import Escher, EscherException

from antavo_ometria_tools.population import make_population, to_classic
from antavo_ometria_tools.sandbox.server import App, Request, Response

REWARDS = {
    "rw-10off": {"id": "rw-10off", "title": "£10 off your next order",
                 "description": "A voucher worth £10 on any order over £50.", "type": "coupon", "points": 1000},
    "rw-coffee": {"id": "rw-coffee", "title": "Free coffee",
                  "description": "One hot drink of your choice in any of our cafés.", "type": "coupon", "points": 300},
}
REWARD_CLAIM_ACTION = "reward"
# Antavo's Escher signing, as its documentation describes it (not taken from the client it checks)
SIGNING = {"algo_prefix": "ANTAVO", "vendor_key": "Antavo", "hash_algo": "SHA256",
           "auth_header_name": "Authorization", "date_header_name": "Date"}


def _when(value: str) -> datetime:
    moment = datetime.fromisoformat(unquote(value).replace("Z", "+00:00").replace(" ", "+"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class AntavoApp(App):
    def __init__(self, api_key: str, api_secret: str, environment: str = "sandbox",
                 customers: int = 200, seed: int = 7, latency: float = 0.0):
        super().__init__()
        self.keys = {api_key: api_secret}
        self.escher = Escher("", "", f"{environment}/api/antavo_request", SIGNING)
        self.latency = latency
        self.customers = make_population(customers, seed)
        self.events: list[dict] = []
        self.listed_extras: dict[int, object] = {}  # position → a raw item the Read API lists there (a null, a repeat)
        self.requests = 0
        self.seen: list[tuple[str, str]] = []  # (method, path and query) of every API request, for tests to read
        self.requests_by_path: Counter = Counter()  # e.g. how often the event feed is polled
        self.request_times: list[tuple[float, str]] = []  # (epoch seconds, path) of every API request, in order
        self.searches = 0  # `updated_at` searches started (first pages answered)
        self.search_changes: list[tuple[int, list[str]]] = []  # (search number, customers to change after its page)

    # -- control -----------------------------------------------------------------------------
    @property
    def customers(self) -> list[dict]:
        return self._customers

    @customers.setter
    def customers(self, customers: list[dict]) -> None:
        self._customers = customers
        self.by_id = {c["_id"]: c for c in customers}
        self.changed()

    def changed(self) -> None:
        """Forget the listings and searches answered so far: call after changing `customers` in place."""
        self._answers: dict = {}

    def _answer(self, key: tuple, compute):
        """A listing or search over the whole population, computed once until the population changes."""
        if key not in self._answers:
            self._answers[key] = compute()
        return self._answers[key]

    def snapshot(self) -> dict:
        with self.lock:
            return {"customers": self.customers, "events": self.events}

    def restore(self, saved: dict) -> None:
        with self.lock:
            self.customers, self.events = saved["customers"], saved["events"]  # (forgets the answers)

    def touch(self, customer_id: str, changes: dict, at: datetime | None = None) -> None:
        """Change a customer as Antavo would: the fields given, and `updated_at`."""
        with self.lock:
            customer = self.by_id[customer_id]
            customer.update(changes)
            customer["updated_at"] = (at or datetime.now(UTC)).isoformat()
            self.changed()

    def change_during_search(self, customer_ids: list[str], search: int = 1) -> None:
        """Change these customers (`updated_at` becomes now, as any change does) right after the first page of
        the `search`-th `updated_at` search has been answered: the list a client is paging shifts under it."""
        with self.lock:
            self.search_changes.append((self.searches + search, list(customer_ids)))

    def _apply_search_changes(self) -> None:
        due = [ids for at, ids in self.search_changes if at == self.searches]
        self.search_changes = [(at, ids) for at, ids in self.search_changes if at != self.searches]
        moment = datetime.now(UTC).isoformat()
        for customer_id in (i for ids in due for i in ids):
            self.by_id[customer_id]["updated_at"] = moment
        if due:
            self.changed()

    def change_quietly(self, customer_id: str, changes: dict) -> None:
        """Change a customer without bumping `updated_at`, as a bulk job in Antavo may: no change list shows it."""
        with self.lock:
            self.by_id[customer_id].update(changes)
            self.changed()

    def add_event(self, customer_id: str, action: str, properties: dict, at: datetime | None = None,
                  event_id: str | None = None) -> dict:
        with self.lock:
            event = {
                "id": event_id or f"ev{len(self.events) + 1:08d}",
                "action": action,
                "label": action.replace("_", " ").capitalize(),
                "Customer": {"id": customer_id},
                "points": -int(properties.get("points", 0) or 0),
                "timestamp": (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "properties": [{"name": k, "label": k.replace("_", " ").capitalize(), "value": v}
                               for k, v in properties.items()],
            }
            self.events.append(event)
            return event

    def claim_reward(self, customer_id: str, reward_id: str, at: datetime | None = None) -> dict:
        reward = REWARDS[reward_id]
        event = self.add_event(customer_id, REWARD_CLAIM_ACTION,
                               {"reward": reward_id, "points": reward["points"]}, at)
        with self.lock:
            claimed = self.by_id[customer_id].setdefault("rewards", {})
            claimed[reward_id] = claimed.get(reward_id, 0) + 1
        return event

    # -- the API -----------------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        if request.path.startswith("/_sandbox/"):
            return self._control(request)
        self.requests += 1
        self.seen.append((request.method, request.target))
        self.requests_by_path[request.path] += 1
        self.request_times.append((time.time(), request.path))
        refused = self._refused(request)
        if refused is not None:
            return refused
        answer, customer_ids = _route(request.path.strip("/").split("/"), self.ROUTES)
        if answer is None:
            return Response(404, {"error": {"type": "NotFoundException", "code": 0, "message": "no such endpoint"}})
        with self.lock:
            return answer(self, request, *customer_ids)

    def _refused(self, request: Request) -> Response | None:
        """A request that is not signed with a known key (401), or not a read (405)."""
        try:
            self.escher.authenticate(
                {"method": request.method, "url": request.target, "headers": request.headers,
                 "body": request.body.decode() if request.body else ""},
                self.keys, ["date"],
            )
        except EscherException as exc:
            return Response(401, {"error": {"message": f"Unauthorized: {exc}", "code": 2132, "resendable": False}})
        if request.method != "GET":
            return Response(405, {"error": {"type": "MethodNotAllowed", "code": 0, "message": "read-only sandbox"}})
        return None

    def _read_api_customer(self, request: Request, customer_id: str) -> Response:
        customer = self.by_id.get(customer_id)
        if customer is None:
            return Response(404, {"error": {"message": "Customer not found", "code": 160212, "resendable": False}})
        return Response(200, {"status": "success", "metadata": {}, "payload": customer})

    def _classic_customer(self, request: Request, customer_id: str) -> Response:
        customer = self.by_id.get(customer_id)
        if customer is None:
            return Response(404, {"error": {"type": "NotFoundException", "code": 160212,
                                            "message": "Customer not found"}})
        classic = to_classic(customer)
        extensions = classic.pop("extensions", None) or {}
        if "expiring_points" in request.query.get("fields", "").split(","):
            classic["expiring_points"] = extensions.get("expiring_points")
        return Response(200, classic)

    def _rewards(self, request: Request, customer_id: str) -> Response:
        customer = self.by_id.get(customer_id) or {}
        rows = [{**REWARDS[r], "times_claimed": n} for r, n in (customer.get("rewards") or {}).items()
                if r in REWARDS]
        return Response(200, {"data": rows})

    def _page(self, request: Request, default_limit: int, max_limit: int) -> tuple[int, int] | Response:
        try:
            limit = int(request.query.get("limit", default_limit))
            offset = int(request.query.get("offset", 0))
        except ValueError:
            return Response(422, {"error": {"message": "limit and offset must be integers", "code": 422,
                                            "resendable": False}})
        if not 1 <= limit <= max_limit or offset < 0:
            return Response(422, {"error": {"message": f"limit must be 1..{max_limit}", "code": 422,
                                            "resendable": False}})
        return limit, offset

    def _read_api_customers(self, request: Request) -> Response:
        page = self._page(request, 20, 1000)
        if isinstance(page, Response):
            return page
        limit, offset = page
        status = request.query.get("filter[status][eq]")
        rows = self._answer(("list", status), lambda: sorted(
            (c for c in self.customers if status is None or c.get("status") == status), key=lambda c: c["created_at"]))
        if self.listed_extras:
            rows = list(rows)
            for position in sorted(self.listed_extras):
                rows.insert(position, self.listed_extras[position])
        chunk = rows[offset: offset + limit]
        more = offset + limit < len(rows)
        return Response(200, {
            "status": "success",
            "metadata": {"pagination": {
                "next": f"/v1/customers?offset={offset + limit}&limit={limit}" if more else None,
                "previous": f"/v1/customers?offset={max(0, offset - limit)}&limit={limit}" if offset else None,
            }},
            "payload": {"customers": chunk},
        })

    def _classic_search(self, request: Request) -> Response:
        page = self._page(request, 100, 1000)
        if isinstance(page, Response):
            return page
        limit, offset = page
        if "email" in request.query:  # exact, case-sensitive match on a searchable field
            rows = [c for c in self.customers if c.get("email") == request.query["email"]]
            return Response(200, {"data": [{"id": c["_id"]} for c in rows[offset: offset + limit]]})
        if "updated_at.gt" not in request.query:
            return Response(400, {"error": {"type": "BadRequestException", "code": 160211,
                                            "message": "Empty search criteria"}})
        after = _when(request.query["updated_at.gt"])
        before = _when(request.query["updated_at.lt"]) if "updated_at.lt" in request.query else None
        ids = self._answer(("updated", after, before), lambda: sorted(
            c["_id"] for c in self.customers if datetime.fromisoformat(c["updated_at"]) > after
            and (before is None or datetime.fromisoformat(c["updated_at"]) < before)))
        answer = Response(200, {"data": [{"id": i} for i in ids[offset: offset + limit]]})
        if offset == 0:  # a search starts
            self.searches += 1
            self._apply_search_changes()
        return answer

    def _events(self, request: Request) -> Response:
        page = self._page(request, 100, 1000)
        if isinstance(page, Response):
            return page
        limit, offset = page
        q = request.query
        bounds = {op: _when(q[f"timestamp.{op}"]) for op in ("gt", "gte", "lt", "lte") if f"timestamp.{op}" in q}

        def inside(event: dict) -> bool:
            moment = _when(event["timestamp"])
            return all((op != "gt" or moment > v) and (op != "gte" or moment >= v)
                       and (op != "lt" or moment < v) and (op != "lte" or moment <= v)
                       for op, v in bounds.items())

        rows = [e for e in self.events if inside(e)]
        return Response(200, {"total": len(rows), "data": rows[offset: offset + limit]})

    def _control(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")
        body = request.json() if request.body else {}
        if parts[1:2] == ["customers"] and len(parts) == 3 and request.method == "POST":
            if parts[2] not in self.by_id:
                return Response(404, {"error": "no such customer"})
            self.touch(parts[2], body)
            return Response(200, self.by_id[parts[2]])
        if parts[1:] == ["change-during-search"] and request.method == "POST":
            unknown = [i for i in body.get("customers", []) if i not in self.by_id]
            if unknown:
                return Response(404, {"error": f"no such customer: {', '.join(unknown)}"})
            self.change_during_search(body["customers"], int(body.get("search", 1)))
            return Response(200, {"pending": len(self.search_changes)})
        if parts[1:] == ["rewards", "claim"] and request.method == "POST":
            return Response(200, self.claim_reward(body["customer"], body["reward"]))
        if parts[1:] == ["stats"]:
            return Response(200, {"customers": len(self.customers), "events": len(self.events),
                                  "requests": self.requests})
        return Response(404, {"error": "unknown sandbox control"})

    # GET path (None: a customer id) → what answers it, with the ids the path names
    ROUTES = (
        (("v1", "customers"), _read_api_customers),
        (("v1", "customers", None), _read_api_customer),
        (("customers",), _classic_search),
        (("customers", "-", "events"), _events),
        (("customers", None), _classic_customer),
        (("customers", None, "rewards"), _rewards),
    )


def _route(parts: list[str], routes: tuple) -> tuple:
    """The first route whose pattern the path's parts match, and the customer ids they name; (None, ()) for none."""
    for pattern, answer in routes:
        if len(pattern) == len(parts) and all(p is None or p == part for p, part in zip(pattern, parts)):
            return answer, [part for p, part in zip(pattern, parts) if p is None]
    return None, ()
