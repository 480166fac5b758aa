"""The subset of OpenAI's completions and chat completions bodies we serve.

Nothing is accepted and ignored: an unknown field is refused (400, naming it), and so is a known OpenAI field we do
not implement unless it carries its neutral value (``logprobs: null``, ``presence_penalty: 0``, ``logit_bias: {}``,
...), which asks for nothing we skip. ``user`` is the one field taken and ignored: it only labels the caller."""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.fields import FieldInfo

from server.api.schemas import StopString
from server.engine.sampling_params import MAX_STOP_STRINGS

# OpenAI's finish reasons that we produce (a request that ends early answers an error instead).
OpenAIFinishReason = Literal["stop", "length"]
_WHY = {"logprobs": " (log-probabilities are not served yet)"}


def _not_served(*neutral: JsonValue) -> Any:
    """A known OpenAI field we do not implement: only its ``neutral`` values are accepted. They are stated once,
    here: the OpenAPI schema publishes them (clients and the fuzzer see them) and ``_Request.unsupported`` refuses any
    other value with 400 naming the field."""
    shown = " or ".join(json.dumps(value) for value in neutral)
    return Field(None, description=f"not implemented: only {shown}", json_schema_extra={"enum": list(neutral)})


def _served_values(info: FieldInfo) -> list[JsonValue] | None:
    """The neutral values of a ``_not_served`` field; None for a field we implement."""
    extra = info.json_schema_extra
    values = extra.get("enum") if isinstance(extra, dict) else None
    return values if isinstance(values, list) else None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="end the stream with a chunk carrying usage and no choices")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # unknown fields refused, known ones typed strictly

    model: str = Field(..., description="an adapter name, or the base model's id")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    ignore_eos: bool = Field(False, description="extension (as in vLLM): keep generating past end-of-sequence tokens")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="the caller's label; accepted and not used")
    # Known OpenAI fields not implemented yet: only their neutral value is accepted; any other value parses, then
    # answers 400 naming the field (``unsupported``).
    presence_penalty: float | None = _not_served(0, None)
    frequency_penalty: float | None = _not_served(0, None)
    logit_bias: dict[str, float] | None = Field(
        None, description="not implemented: only {} or null", json_schema_extra={"maxProperties": 0}
    )

    def unsupported(self) -> list[str]:
        """The fields set to something this server does not do (each must be refused, never ignored)."""
        out = []
        for name, info in type(self).model_fields.items():
            served = _served_values(info)
            value = getattr(self, name)
            if served is not None and value not in served:
                out.append(f"{name} = {_shown(value)}" + _WHY.get(name, ""))
        if self.logit_bias:
            out.append("logit_bias (not empty)")
        return out

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., description="one prompt (a list must hold exactly one string)")
    max_tokens: int | None = Field(16, ge=1, le=1_000_000)
    echo: bool = False
    logprobs: int | None = _not_served(None)
    best_of: int | None = _not_served(1, None)
    suffix: str | None = _not_served(None)

    def single_prompt(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt must be a string or a list of exactly one string")
        return self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = _not_served(False, None)
    top_logprobs: int | None = _not_served(0, None)


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lora-server"
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
