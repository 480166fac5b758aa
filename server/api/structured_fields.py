"""The request fields that ask for structured output, as each API spells them, and the one spec they become.

OpenAI's ``response_format`` (``text`` | ``json_object`` | ``json_schema``), vLLM's older ``guided_json`` /
``guided_regex`` / ``guided_choice`` and its current ``structured_outputs`` object on the OpenAI endpoints; one
``structured_output`` object on our ``/v1/generate``. A request sets at most one of them (400 otherwise); each becomes
a ``StructuredOutputSpec`` that ``server.api.grammar.compile_grammar`` turns into the grammar the engine applies.
"""

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from server.api.errors import ApiError
from server.engine.structured_output import StructuredOutputSpec

JsonSchema = dict[str, JsonValue]
Choices = Annotated[list[str], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- OpenAI: response_format ----------------------------------------------------------------------------------------
class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: JsonSchema = Field(..., alias="schema", description="the JSON Schema the output must validate against")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced exactly")


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


# ---- vLLM: structured_outputs ---------------------------------------------------------------------------------------
class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` (exactly one of its fields set; ``grammar``, ``structural_tag``... refused)."""

    json_: JsonSchema | str | None = Field(None, alias="json", description="a JSON Schema (object or JSON text)")
    regex: str | None = None
    choice: Choices | None = None
    json_object: bool | None = Field(None, description="true: any JSON object")


# ---- ours: /v1/generate's structured_output -----------------------------------------------------------------------
class JsonObjectOutput(_Strict):
    type: Literal["json_object"]


class JsonSchemaOutput(_Strict):
    type: Literal["json_schema"]
    schema_: JsonSchema = Field(..., alias="schema")


class RegexOutput(_Strict):
    type: Literal["regex"]
    pattern: str


class ChoiceOutput(_Strict):
    type: Literal["choice"]
    choices: Choices


GenerateOutput = JsonObjectOutput | JsonSchemaOutput | RegexOutput | ChoiceOutput
StructuredOutput = Annotated[GenerateOutput, Field(discriminator="type")]


def _schema(value: JsonSchema | str, field: str) -> StructuredOutputSpec:
    """A JSON schema given as an object or as JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ApiError(400, "invalid_request", f"{field}: not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "invalid_request", f"{field}: a JSON schema must be an object")
        value = parsed
    return StructuredOutputSpec("json_schema", json.dumps(value))


def _from_structured_outputs(value: StructuredOutputs) -> StructuredOutputSpec:
    specs: list[StructuredOutputSpec] = []
    if value.json_ is not None:
        specs.append(_schema(value.json_, "structured_outputs.json"))
    if value.regex is not None:
        specs.append(StructuredOutputSpec("regex", value.regex))
    if value.choice is not None:
        specs.append(StructuredOutputSpec("choice", tuple(value.choice)))
    if value.json_object:
        specs.append(StructuredOutputSpec("json_object"))
    if len(specs) != 1:
        raise ApiError(400, "invalid_request", "structured_outputs must set exactly one of json, regex, choice, "
                       f"json_object (true); it sets {len(specs)}")  # fmt: skip
    return specs[0]


def openai_spec(
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None,
    guided_json: JsonSchema | str | None,
    guided_regex: str | None,
    guided_choice: list[str] | None,
    structured_outputs: StructuredOutputs | None,
) -> StructuredOutputSpec | None:
    """The structured output an OpenAI-endpoint body asks for (None: free text); 400 when it asks in two ways."""
    asked: dict[str, StructuredOutputSpec] = {}
    if isinstance(response_format, JsonObjectFormat):
        asked["response_format"] = StructuredOutputSpec("json_object")
    elif isinstance(response_format, JsonSchemaFormat):
        asked["response_format"] = _schema(response_format.json_schema.schema_, "response_format.json_schema.schema")
    if guided_json is not None:
        asked["guided_json"] = _schema(guided_json, "guided_json")
    if guided_regex is not None:
        asked["guided_regex"] = StructuredOutputSpec("regex", guided_regex)
    if guided_choice is not None:
        asked["guided_choice"] = StructuredOutputSpec("choice", tuple(guided_choice))
    if structured_outputs is not None:
        asked["structured_outputs"] = _from_structured_outputs(structured_outputs)
    if len(asked) > 1:
        raise ApiError(400, "invalid_request", f"at most one structured-output field per request: {', '.join(asked)}")
    return next(iter(asked.values()), None)


def generate_spec(value: GenerateOutput | None) -> StructuredOutputSpec | None:
    """The structured output a ``/v1/generate`` body asks for (None: free text)."""
    if value is None:
        return None
    if isinstance(value, JsonObjectOutput):
        return StructuredOutputSpec("json_object")
    if isinstance(value, JsonSchemaOutput):
        return _schema(value.schema_, "structured_output.schema")
    if isinstance(value, RegexOutput):
        return StructuredOutputSpec("regex", value.pattern)
    return StructuredOutputSpec("choice", tuple(value.choices))
