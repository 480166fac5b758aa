"""The OpenAI completions and chat completions bodies we serve (the answers are in ``openai_responses``).

Nothing is accepted and ignored: an unknown field is refused (400, naming it), and so is a known OpenAI field we do
not implement (``suffix``) unless it carries its neutral value, and a value we do not serve (``best_of`` above
``n``). ``user`` is the one field taken and ignored: it only labels the caller."""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.fields import FieldInfo

from server.api.schemas import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, LogitBias, StopString, TokenId
from server.api.structured_fields import Choices, JsonSchema, ResponseFormat, StructuredOutputs
from server.engine.logprob import MAX_TOP_LOGPROBS
from server.engine.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

MAX_PROMPTS = 64  # prompts of one completions request
MAX_N = 16  # choices per prompt


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

    model: str | None = Field(
        None,
        description="an adapter name, a weighted mixture mix:<name>*<weight>+..., or the base model's id (null or "
        "absent: the base)",
    )
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=1_000_000, description="extension (vLLM): -1 or 0 = off")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="extension (vLLM): token ids that end a choice"
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="choice i of a prompt uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="the caller's label; accepted and not used")
    ignore_eos: bool = Field(False, description="extension (as in vLLM): keep generating past end-of-sequence tokens")
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(
        1.0,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        description="extension (vLLM): 1 = off; > 1 discourages prompt and output tokens",
    )
    logit_bias: LogitBias | None = None
    min_tokens: int = Field(0, ge=0, le=1_000_000, description="extension (vLLM): no EOS or stop before this many")
    skip_special_tokens: bool = Field(True, description="extension (vLLM): leave special tokens out of the text")
    response_format: ResponseFormat | None = None
    guided_json: JsonSchema | str | None = Field(None, description="extension (vLLM): a JSON Schema to follow")
    guided_regex: str | None = Field(None, description="extension (vLLM): a regular expression to follow")
    guided_choice: Choices | None = Field(None, description="extension (vLLM): the output is one of these")
    structured_outputs: StructuredOutputs | None = Field(None, description="extension (vLLM): one of its fields")

    def unsupported(self) -> list[str]:
        """The fields set to something this server does not do (each must be refused, never ignored)."""
        out = []
        for name, info in type(self).model_fields.items():
            served = _served_values(info)
            value = getattr(self, name)
            if served is not None and value not in served:
                out.append(f"{name} = {_shown(value)}")
        return out

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


Prompts = Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
TokenPrompt = Annotated[list[TokenId], Field(min_length=1)]
TokenPrompts = Annotated[list[TokenPrompt], Field(min_length=1, max_length=MAX_PROMPTS)]


class CompletionRequest(_Request):
    prompt: str | Prompts | TokenPrompt | TokenPrompts = Field(
        ..., description=f"a string, a list of strings, a list of token ids, or a list of such lists (at most "
        f"{MAX_PROMPTS} prompts); one choice per prompt and per n"
    )  # fmt: skip
    max_tokens: int | None = Field(16, ge=0, le=1_000_000, description="0: only score the prompt (needs echo)")
    echo: bool = Field(False, description="the prompt's text (and, with logprobs, its tokens) before the completion")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token (vLLM: <= 20)")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only null or n")
    suffix: str | None = _not_served(None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = Field(False, description="log-probabilities of each generated token")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token (needs logprobs: true)"
    )
