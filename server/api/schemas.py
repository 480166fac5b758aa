"""Request and response bodies of our own API. Every limit a client can hit is declared here, so FastAPI answers 422."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from server.adapters.mixture import MAX_MIXTURE_PARTS, MAX_MIXTURE_WEIGHT
from server.adapters.registry import NAME_PATTERN
from server.api.structured_fields import StructuredOutput
from server.engine.logprob import MAX_TOP_LOGPROBS
from server.engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    REPETITION_PENALTY_RANGE,
)

FinishReasonName = Literal["length", "stop", "eos"]
# A stream has already answered 200 when something goes wrong, so its last event says so.
StreamFinishReason = Literal["length", "stop", "eos", "timeout", "error"]
# Both APIs' stop strings: at most MAX_STOP_STRINGS of at most MAX_STOP_LENGTH characters (see engine.sampling_params).
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
# The engine's bound on the repetition penalty (see engine.sampling_params), declared so both APIs answer 422.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = REPETITION_PENALTY_RANGE
# A token id; its upper bound, the model's vocabulary size, is checked per request (400).
TokenId = Annotated[int, Field(ge=0)]
# Both APIs' logit_bias: token id (as a decimal string, JSON keys are strings) -> bias added to its logit.
_BiasKey = Annotated[str, Field(pattern=r"^[0-9]{1,12}$")]
_Bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
LogitBias = Annotated[
    dict[_BiasKey, _Bias],
    Field(max_length=MAX_LOGIT_BIAS_ENTRIES, description="token id -> bias in [-100, 100] added to its logit"),
]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class MixturePartBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., pattern=NAME_PATTERN, description="a registered adapter")
    weight: float = Field(
        ..., ge=-MAX_MIXTURE_WEIGHT, le=MAX_MIXTURE_WEIGHT, allow_inf_nan=False, description="may be negative"
    )


class AdapterMixture(BaseModel):
    """A weighted mixture of adapters, computed as PEFT's ``add_weighted_adapter(..., combination_type="cat")``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mix: list[MixturePartBody] = Field(..., min_length=1, max_length=MAX_MIXTURE_PARTS)

    @field_validator("mix")
    @classmethod
    def _distinct(cls, parts: list[MixturePartBody]) -> list[MixturePartBody]:
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError("each adapter appears once in a mixture; give it one weight")
        return parts


# An adapter name or a mixture key ``mix:<name>*<weight>+...`` (8 parts of 64-character names fit in 1024), or a
# mixture object; tagged, so an error names one of them ("adapter.mixture.mix.0.weight"), not both.
AdapterField = Annotated[
    Annotated[str, Field(min_length=1, max_length=1024), Tag("name")] | Annotated[AdapterMixture, Tag("mixture")],
    Discriminator(lambda v: "name" if isinstance(v, str) else "mixture"),
]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: no true -> 1.0, no "8" -> 8

    adapter: AdapterField | None = Field(
        None,
        description='adapter name, {"mix": [{"name", "weight"}, ...]} or "mix:<name>*<weight>+..."; null or '
        "absent for the base model",
    )
    prompt: str = Field(..., min_length=1, description="raw prompt text (no chat template applied)")
    max_new_tokens: int = Field(128, ge=0, le=1_000_000, description="0: only score the prompt (with prompt_logprobs)")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    ignore_eos: bool = False
    stream: bool = False
    logprobs: TopK | None = Field(None, description="log-probability of each generated token, and k alternatives")
    prompt_logprobs: TopK | None = Field(None, description="the same for each prompt token after the first")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, description="1 = off")
    logit_bias: LogitBias = Field(default_factory=dict)
    min_tokens: int = Field(0, ge=0, le=1_000_000, description="no end-of-sequence or stop before this many tokens")
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None


class TokenAlternative(BaseModel):
    id: int
    text: str = Field(description="the token decoded alone")
    logprob: float = Field(description="-9999.0 stands for minus infinity")


class TokenLogprobInfo(TokenAlternative):
    top: list[TokenAlternative] = Field(description="the most probable tokens at this position, most probable first")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    adapter: str | None = Field(description="the adapter's name, or a mixture's key mix:<name>*<weight>+...")
    text: str
    finish_reason: FinishReasonName
    usage: Usage
    logprobs: list[TokenLogprobInfo] | None = Field(None, description="with logprobs: one per generated token")
    prompt_logprobs: list[TokenLogprobInfo | None] | None = Field(
        None, description="with prompt_logprobs: one per prompt token, the first null"
    )


class StreamToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(None, description="with logprobs")
    top: list[TokenAlternative] | None = Field(None, description="with logprobs")


class StreamEvent(BaseModel):
    """One Server-Sent Event of a streamed generation: a token, or the final event (finish_reason and usage)."""

    id: str
    token: StreamToken | None = None
    finish_reason: StreamFinishReason | None = None
    usage: Usage | None = None
    error: str | None = Field(None, description="why the stream ended early (finish_reason timeout or error)")
    prompt_logprobs: list[TokenLogprobInfo | None] | None = Field(None, description="with prompt_logprobs, last event")


class AdapterInfo(BaseModel):
    name: str
    rank: int
    alpha: float
    target_modules: list[str] | str
    size_bytes: int
    sha256: str
    created_at: str
    state: Literal["disk", "cpu", "gpu"]


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=`` for OpenAPI: each of these status codes answers with an ErrorResponse body."""
    return {code: {"model": ErrorResponse} for code in codes}
