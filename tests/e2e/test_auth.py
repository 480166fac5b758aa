"""Who may call what, on real servers: every route x {no key, wrong key, API key, admin key} for each key
configuration, and keys decided from the request head before any byte of the body is read (issue 13, items 3, 14).

A refusal is sent as a head that declares a body and carries ``Expect: 100-continue``, and no body follows. uvicorn
answers ``100 Continue`` as soon as the app asks for the body, so a server that reads (or spools) the body before it
checks the key answers 100 here, or waits; the key check answers 401/403 at once, as the first response.
"""

import re
import socket
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx
import pytest

from loadtests.common.server_process import ServerProcess
from tests.helpers.paths import REPO_ROOT

API, ADMIN = "test-api-key-1", "test-admin-key-2"
OK = "ok"  # the route's own answer (the status listed with its request below): the key check let it through

# Each endpoint: the access its route declares, and a cheap request whose own answer shows it got past the keys.
ROUTES: dict[tuple[str, str], tuple[str, str, dict, int]] = {
    ("GET", "/health"): ("health", "/health", {}, 200),
    ("GET", "/ready"): ("health", "/ready", {}, 200),
    ("GET", "/metrics"): ("metrics", "/metrics", {}, 200),
    ("POST", "/v1/generate"): ("inference", "/v1/generate", {"json": {}}, 422),
    ("POST", "/v1/completions"): ("inference", "/v1/completions", {"json": {}}, 422),
    ("POST", "/v1/chat/completions"): ("inference", "/v1/chat/completions", {"json": {}}, 422),
    ("GET", "/v1/models"): ("inference", "/v1/models", {}, 200),
    ("GET", "/v1/adapters"): ("inference", "/v1/adapters", {}, 200),
    ("GET", "/v1/adapters/{name}"): ("inference", "/v1/adapters/nope", {}, 404),
    ("POST", "/v1/adapters"): ("admin", "/v1/adapters", {"data": {"name": "x"}}, 400),  # a form without files
    ("DELETE", "/v1/adapters/{name}"): ("admin", "/v1/adapters/nope", {}, 404),
    ("POST", "/v1/load_lora_adapter"): ("admin", "/v1/load_lora_adapter", {"json": {}}, 422),
    ("POST", "/v1/unload_lora_adapter"): ("admin", "/v1/unload_lora_adapter", {"json": {}}, 422),
    ("POST", "/tokenize"): ("inference", "/tokenize", {"json": {}}, 422),
    ("POST", "/detokenize"): ("inference", "/detokenize", {"json": {}}, 422),
    ("GET", "/openapi.json"): ("open", "/openapi.json", {}, 200),
    ("GET", "/docs"): ("open", "/docs", {}, 200),
    ("GET", "/docs/oauth2-redirect"): ("open", "/docs/oauth2-redirect", {}, 200),
    ("GET", "/redoc"): ("open", "/redoc", {}, 200),
}

# The headers tried for each column; every variant of a column must get the same answer.
KEYS: dict[str, list[dict[str, str]]] = {
    "no key": [{}],
    "wrong key": [
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {API}x"},
        {"Authorization": f"Basic {API}"},  # the right key under another scheme is no key
        {"Authorization": API},
        {"Authorization": "Bearer"},
    ],
    "API key": [{"Authorization": f"Bearer {API}"}, {"Authorization": f"bearer   {API}"}],
    "admin key": [{"Authorization": f"Bearer {ADMIN}"}],
}

# Per configuration: its flags, the key /ready needs, and access -> answers for the KEYS columns, in order. The
# inference and admin rows are documented in docs/api.md ("Keys: who may call what") and checked against it below.
CONFIGS: dict[str, tuple[tuple[str, ...], str | None, dict[str, tuple[int | str, ...]]]] = {
    "`--api-key`, `--admin-key`": (
        ("--api-key", API, "--admin-key", ADMIN, "--health-requires-key", "--metrics-requires-key"),
        API,
        {
            "inference": (401, 401, OK, OK),
            "admin": (401, 401, 403, OK),
            "health": (401, 401, OK, OK),  # --health-requires-key
            "metrics": (401, 401, OK, OK),  # --metrics-requires-key
            "open": (OK, OK, OK, OK),
        },
    ),
    "`--api-key`": (
        ("--api-key", API),
        None,
        {
            "inference": (401, 401, OK, 401),  # ADMIN is no key of this server
            "admin": (401, 401, OK, 401),  # without an admin key, the API key guards adapters
            "health": (OK, OK, OK, OK),
            "metrics": (OK, OK, OK, OK),
            "open": (OK, OK, OK, OK),
        },
    ),
    "`--admin-key`": (
        ("--admin-key", ADMIN, "--health-requires-key"),
        ADMIN,
        {
            "inference": (401, 401, 401, OK),  # the admin key works for inference; API is no key here
            "admin": (401, 401, 401, OK),
            "health": (401, 401, 401, OK),
            "metrics": (OK, OK, OK, OK),
            "open": (OK, OK, OK, OK),
        },
    ),
}
DOC = REPO_ROOT / "docs" / "api.md"


class Server(NamedTuple):
    url: str
    config: str  # a CONFIGS key
    valid_key: str  # a key this server accepts for inference


@pytest.fixture(scope="module", params=list(CONFIGS), ids=["api+admin", "api-only", "admin-only"])
def server(request, tiny_model_dir, tmp_path_factory):
    """One server per key configuration, shared by every case of it."""
    flags, ready_key, _ = CONFIGS[request.param]
    data = tmp_path_factory.mktemp("auth")
    proc = ServerProcess(tiny_model_dir("llama"), data / "store", "--max-seq-len", "128",
                         "--startup-adapters", str(data / "none"), *flags)  # fmt: skip
    proc.start(ready_headers={"Authorization": f"Bearer {ready_key}"} if ready_key else None)
    try:
        yield Server(proc.url, request.param, API if "--api-key" in flags else ADMIN)
    finally:
        proc.stop()


def send_head(url: str, method: str, path: str, headers: dict[str, str], declared: int = 1_000_000,
              content_type: str = "application/json") -> socket.socket:  # fmt: skip
    """Open a connection and send a request head that declares ``declared`` body bytes and waits for
    100-continue (a ``Transfer-Encoding`` in ``headers`` replaces the length); no body is sent."""
    parts = urlsplit(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Type: {content_type}",
             "Expect: 100-continue", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    if "Transfer-Encoding" not in headers:
        lines.append(f"Content-Length: {declared}")
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The next response on ``sock``: (status, lower-cased headers, body). A 100 means the app asked for the body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection without answering"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    got = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    status = int(status_line.split()[1])
    while status != 100 and len(body) < int(got.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "the answer was cut short"
        body += chunk
    return status, got, body


def head_only(url: str, method: str, path: str, headers: dict[str, str], declared: int = 1_000_000,
              content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """The first response to a request head sent without its body."""
    with send_head(url, method, path, headers, declared, content_type) as sock:
        return read_response(sock)


def refusal(url: str, method: str, path: str, headers: dict[str, str]) -> int:
    """The status of a request expected to be refused, sent as a head only; a refusal must be a JSON error."""
    status, got, body = head_only(url, method, path, headers)
    if status in (401, 403):
        error_type = httpx.Response(status, content=body).json()["error"]["type"]
        assert error_type == {401: "unauthorized", 403: "forbidden"}[status]
        assert status == 403 or got.get("www-authenticate") == "Bearer"
    return status


def answers(url: str, method: str, route: tuple[str, str, dict, int], expected: tuple[int | str, ...]) -> tuple:
    """The answer to each KEYS column (OK when the route's own status came back), a set if its variants disagree."""
    _, path, kwargs, own = route
    observed: list[int | str | set] = []
    for column, want in zip(KEYS.values(), expected, strict=True):
        seen = set()
        for headers in column:
            if want == OK:
                status = httpx.request(method, f"{url}{path}", headers=headers, timeout=30, **kwargs).status_code
            else:
                status = refusal(url, method, path, headers)
            seen.add(OK if status == own else status)
        observed.append(seen.pop() if len(seen) == 1 else seen)
    return tuple(observed)


@pytest.mark.parametrize("endpoint", list(ROUTES), ids=[f"{m} {p}" for m, p in ROUTES])
def test_key_matrix(server, endpoint) -> None:
    access = ROUTES[endpoint][0]
    expected = CONFIGS[server.config][2][access]
    assert answers(server.url, endpoint[0], ROUTES[endpoint], expected) == expected


def test_upload_is_refused_from_its_head_before_any_body_byte(server) -> None:
    """A 100 MB upload head without the right key is answered 401/403 before the client sends a byte of its body,
    so nothing is read or spooled; with the right key the same head gets 100 Continue (the server asks for the
    body), so the refusals are not an artefact of the harness."""
    form = "multipart/form-data; boundary=b"
    for column, want in zip(KEYS.values(), CONFIGS[server.config][2]["admin"], strict=True):
        for headers in column:
            status = head_only(server.url, "POST", "/v1/adapters", headers, 100_000_000, form)[0]
            assert status == (100 if want == OK else want), headers
    chunked = {"Transfer-Encoding": "chunked"}  # no declared length: refused from the head all the same
    assert head_only(server.url, "POST", "/v1/adapters", chunked, content_type=form)[0] == 401


def test_a_refused_body_is_thrown_away_and_the_connection_kept(server) -> None:
    """After a refusal the client may still send the body it declared (httpx's async client writes it all before
    it reads): the server throws it away and answers the next request on the same connection."""
    with send_head(server.url, "POST", "/v1/generate", {}, declared=1000) as sock:
        assert read_response(sock)[0] == 401
        sock.sendall(b"x" * 1000 + b"GET /openapi.json HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_a_refused_body_larger_than_any_limit_is_hung_up_on(server) -> None:
    """A body no route would take (over the upload limit) is not received at all: Connection: close, then EOF."""
    form = "multipart/form-data; boundary=b"
    with send_head(server.url, "POST", "/v1/adapters", {}, declared=10**12, content_type=form) as sock:
        status, headers, _ = read_response(sock)
        assert (status, headers.get("connection")) == (401, "close")
        assert sock.recv(1) == b""


def test_unknown_paths_and_methods_need_a_key_then_get_404_405(server) -> None:
    """Fail closed: a request that matches no route needs any valid key once keys are configured."""
    key = {"Authorization": f"Bearer {server.valid_key}"}
    for method, path, own in (("GET", "/nope", 404), ("PUT", "/v1/adapters/x", 405), ("POST", "/health", 405)):
        assert refusal(server.url, method, path, {}) == 401
        assert httpx.request(method, f"{server.url}{path}", headers=key, timeout=10).status_code == own


def test_openapi_marks_exactly_the_endpoints_that_need_a_key(server) -> None:
    """/openapi.json (so /docs) shows the bearer lock where this server's keys refuse a request without one."""
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for (method, path), (access, *_) in ROUTES.items():
        operation = schema["paths"].get(path, {}).get(method.lower())
        if operation is None:
            assert access == "open", f"{method} {path} is missing from the schema"
            continue
        expected = CONFIGS[server.config][2][access]
        assert ("security" in operation) == (expected[0] != OK), (method, path)
        refusals = {str(status) for status in expected if status != OK}
        assert refusals <= set(operation["responses"]), (method, path)


def test_every_route_is_in_the_matrix(tiny_model_dir, tmp_path) -> None:
    """The app's own route table (what KeyGuard enforces) lists exactly ROUTES, with the same access each."""
    from server.api.app import create_app
    from server.config import Settings
    from server.service import Service

    fields = {"base_model": tiny_model_dir("llama"), "data_dir": tmp_path / "store", "startup_adapters": None,
              "max_seq_len": 64, "gpu_slots": 1, "api_key": API}  # fmt: skip
    settings = Settings.model_validate(fields)
    table = create_app(Service(settings)).state.access_table
    declared = {
        (method, entry.path): tuple(str(a) for a in entry.needs)
        for entry in table.entries
        for method in entry.methods - {"HEAD"}  # HEAD rides along with GET on Starlette routes
    }
    assert declared == {endpoint: (route[0],) for endpoint, route in ROUTES.items()}


def test_docs_matrix_matches_the_tests() -> None:
    """docs/api.md's tables say what the tests check: each endpoint's access, and the answers per configuration."""
    section = DOC.read_text().split("## Keys: who may call what")[1].split("\n## ")[0]
    documented = {(m, p): a for m, p, a in re.findall(r"^\| `(GET|POST|DELETE) (\S+)` \| (\w+) \|", section, re.M)}
    assert documented == {endpoint: route[0] for endpoint, route in ROUTES.items()}
    cells = r" \| ([^|]+)" * 4
    rows = re.findall(r"^\| (`--[^|]*`) \| (inference|admin)" + cells + r" \|", section, re.M)
    table = {(config, access): tuple(c.strip() for c in cells) for config, access, *cells in rows}
    expected = {
        (config, access): tuple(str(a) for a in answers_)
        for config, (_, _, by_access) in CONFIGS.items()
        for access, answers_ in by_access.items()
        if access in ("inference", "admin")
    }
    assert table == expected
