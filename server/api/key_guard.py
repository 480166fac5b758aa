"""``KeyGuard``: API keys are checked from the request head, before any byte of the body is read.

FastAPI reads and parses a request's body (for an upload: spools up to about 1 GiB of multipart form to disk) before
it runs a route's dependencies, so a key check in a dependency comes too late. This middleware sits outside every
other one (``BodySizeGuard`` included) and decides from the method, path and ``Authorization`` header alone.

Which key a route needs is read from the route itself (its ``KeyRequirement`` dependency, see ``server.api.auth``),
so the table here cannot drift from the routes: ``AccessTable.from_routes`` refuses a route that declares nothing,
and ``document_keys`` writes the same table into the OpenAPI schema.
A request is matched to its route with Starlette's own ``Route.matches``, in route order, exactly as the router
will dispatch it. A request that matches no route (an unknown path, or a known path with another method) needs any
valid key when keys are configured: nothing is reachable there, but failing closed means a route the table does not
know is never reached without a key. Such a request gets its 404/405 once it carries a key.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fastapi.routing
from fastapi.dependencies.models import Dependant
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.auth import Access, KeyPolicy, KeyRequirement
from server.api.errors import error_response

UNMATCHED = (Access.INFERENCE,)
BEARER = "bearer"  # the OpenAPI security scheme's name
_REFUSALS = {401: "no key this server knows", 403: "the API key where the admin key is needed"}


def _requirements(dependant: Dependant | None) -> Iterable[Access]:
    for sub in dependant.dependencies if dependant is not None else ():
        if isinstance(sub.call, KeyRequirement):
            yield sub.call.access
        yield from _requirements(sub)


def _as_dispatched(routes: Sequence[BaseRoute]) -> list[Any]:
    """Each route as the router dispatches it, with ``matches``, ``path``, ``methods`` and (API routes)
    ``dependant``. Recent FastAPI keeps an included router as one entry of ``app.routes`` and offers
    ``iter_route_contexts`` to see the routes inside (prefix and inherited dependencies applied); older releases
    copy those routes into ``app.routes`` themselves."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(flatten(routes)) if flatten is not None else list(routes)


@dataclass(frozen=True)
class Entry:
    route: Any  # a route or FastAPI's RouteContext: anything with Starlette's ``matches(scope)``
    path: str  # as the OpenAPI schema writes it: /v1/adapters/{name}
    methods: frozenset[str]
    needs: tuple[Access, ...]  # all must hold; usually one
    pattern: str = ""  # as the route was declared, converters included: /v1/adapters/{name:path}


# (route pattern, methods, accesses): a table entry as plain data, for another process (the Ray ingress) to rebuild
Rule = tuple[str, tuple[str, ...], tuple[str, ...]]


def _not_dispatched(*_: object) -> None:  # the endpoint of a rebuilt route: only its ``matches`` is ever used
    raise AssertionError("a route rebuilt from rules only matches requests")


@dataclass(frozen=True)
class AccessTable:
    """Every route and the accesses it needs, in the router's order."""

    entries: tuple[Entry, ...]

    @classmethod
    def from_routes(cls, routes: Sequence[BaseRoute], open_paths: Iterable[str | None]) -> "AccessTable":
        """``open_paths``: FastAPI's own documentation routes (``/docs``, ``/openapi.json``...), which never need
        a key. Any other route must declare its access with a ``KeyRequirement`` dependency."""
        open_set = {p for p in open_paths if p}
        entries = []
        for route in _as_dispatched(routes):
            path = getattr(route, "path", None)
            needs = tuple(dict.fromkeys(_requirements(getattr(route, "dependant", None))))
            if not needs and path in open_set:
                needs = (Access.OPEN,)
            if not needs or path is None:
                raise ValueError(f"route {path or route!r} declares no key requirement (add a server.api.auth one)")
            shown = getattr(route, "path_format", path)  # without converters ({name:path} -> {name})
            entries.append(Entry(route, shown, frozenset(getattr(route, "methods", None) or ()), needs, path))
        return cls(tuple(entries))

    def rules(self) -> list[Rule]:
        """The table as plain data, which ``from_rules`` turns back into a table that matches the same requests."""
        return [(e.pattern, tuple(sorted(e.methods)), tuple(a.value for a in e.needs)) for e in self.entries]

    @classmethod
    def from_rules(cls, rules: Sequence[Rule]) -> "AccessTable":
        entries = []
        for pattern, methods, needs in rules:
            route = Route(pattern, _not_dispatched, methods=list(methods))
            route.methods = set(methods)  # exactly these: Starlette would add HEAD to a GET route
            entries.append(
                Entry(route, route.path_format, frozenset(methods), tuple(Access(a) for a in needs), pattern)
            )
        return cls(tuple(entries))

    def lookup(self, scope: Scope) -> tuple[Access, ...]:
        for entry in self.entries:
            match, _ = entry.route.matches(scope)
            if match is Match.FULL:
                return entry.needs
        return UNMATCHED


def document_keys(schema: dict[str, Any], table: AccessTable, policy: KeyPolicy) -> None:
    """Mark, in an OpenAPI schema, the operations that need a key under ``policy`` with the bearer scheme (``/docs``
    shows a lock on them and its "Authorize" button sends the key) and their 401/403 answers. With no key
    configured nothing is marked: the schema says what this server does, which is what clients and fuzzers read."""
    marked = False
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    has_error_model = "ErrorResponse" in schema.get("components", {}).get("schemas", {})
    for entry in table.entries:
        refusals = sorted({status for access in entry.needs for status in policy.refusals(access)})
        for method in entry.methods if refusals else ():
            operation = schema.get("paths", {}).get(entry.path, {}).get(method.lower())
            if operation is None:  # not in the schema: FastAPI's documentation routes, hidden routes
                continue
            operation["security"] = [{BEARER: []}]
            for status in refusals:
                answer = {"description": _REFUSALS[status], **(error if has_error_model else {})}
                operation.setdefault("responses", {}).setdefault(str(status), answer)
            marked = True
    if marked:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[BEARER] = {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"}


class KeyGuard:
    """ASGI middleware: a request its route's accesses refuse is answered 401/403 here; its body is never read."""

    def __init__(self, app: ASGIApp, policy: KeyPolicy, table: AccessTable, max_body_bytes: int) -> None:
        self.app = app
        self.policy = policy
        self.table = table
        self.max_body_bytes = max_body_bytes  # the largest body any route accepts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; the app has no websocket routes
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        for access in self.table.lookup(scope):
            refusal = self.policy.refusal(access, authorization)
            if refusal is not None:
                hang_up = {"Connection": "close"} if _over(self.max_body_bytes, scope) else {}
                headers = {**(refusal.headers or {}), **hang_up}
                await error_response(refusal.status, refusal.type, refusal.message, headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _over(limit: int, scope: Scope) -> bool:
    """Whether a refused request declares a body over ``limit``, the largest body the server takes anywhere.

    The app never reads a refused body; uvicorn then receives and throws away whatever the client still sends, so
    that a client still writing its body (httpx's async client does not read before it has written) reads its
    answer rather than a connection reset, and can reuse the connection. A body larger than any the server accepts
    is hostile: its answer says Connection: close and the server hangs up instead of receiving it."""
    length = dict(scope["headers"]).get(b"content-length")  # h11 refuses two different Content-Lengths
    return length is not None and (not length.isdigit() or int(length) > limit)
