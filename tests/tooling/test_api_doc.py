"""docs/api.md and the FastAPI OpenAPI schema list the same endpoints."""

import re

import pytest

from tests.helpers.paths import REPO_ROOT

DOC = REPO_ROOT / "docs" / "api.md"
DOCUMENTED = set(re.findall(r"^### `(GET|POST|DELETE|PUT|PATCH) (/\S*)`$", DOC.read_text(), flags=re.M))


@pytest.fixture(scope="module")
def schema(tiny_model_dir, tmp_path_factory):
    from server.api.app import create_app
    from server.config import Settings
    from server.service import Service

    data = tmp_path_factory.mktemp("api-doc")
    settings = Settings(base_model=tiny_model_dir("llama"), data_dir=data / "store", startup_adapters=None,
                        max_seq_len=64, gpu_slots=1)  # fmt: skip
    return create_app(Service(settings)).openapi()


def test_every_documented_endpoint_exists_and_nothing_else(schema) -> None:
    served = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    assert DOCUMENTED, "no endpoints parsed from docs/api.md"
    assert served == DOCUMENTED


def test_generate_fields_match_the_doc(schema) -> None:
    fields = set(schema["components"]["schemas"]["GenerateRequest"]["properties"])
    table = DOC.read_text().split("### `POST /v1/generate`")[1].split("Answer:")[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert fields == documented


def _first_column_names(table: str) -> set[str]:
    """The backticked names in the first column of every markdown table row in ``table``."""
    names: set[str] = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, flags=re.M):
        names.update(re.findall(r"`(\w+)`", cell))
    return names


@pytest.mark.parametrize(
    "model, heading",
    [("CompletionRequest", "### `POST /v1/completions`"), ("ChatCompletionRequest", "### `POST /v1/chat/completions`")],
)
def test_openai_fields_match_the_doc(schema, model, heading) -> None:
    """Every field an OpenAI body accepts is in docs/api.md (the table of both endpoints' fields, then the endpoint's
    own table), and nothing documented there is missing from the schema. ``messages`` is described in prose."""
    fields = set(schema["components"]["schemas"][model]["properties"]) - {"messages"}
    section = DOC.read_text().split("## OpenAI-compatible")[1].split("### `GET /v1/models`")[0]
    common = section.split("### `POST /v1/completions`")[0]
    own = section.split(heading)[1].split("\n### ")[0]
    assert fields == _first_column_names(common + own)
