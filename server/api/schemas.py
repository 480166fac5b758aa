"""Request and response bodies of our own API. Every limit a client can hit is declared here, so FastAPI answers 422."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.engine.sampling_params import MAX_STOP_LENGTH, MAX_STOP_STRINGS

FinishReasonName = Literal["length", "stop", "eos"]
# A stream has already answered 200 when something goes wrong, so its last event says so.
StreamFinishReason = Literal["length", "stop", "eos", "timeout", "error"]
# Both APIs' stop strings: at most MAX_STOP_STRINGS of at most MAX_STOP_LENGTH characters (see engine.sampling_params).
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: no true -> 1.0, no "8" -> 8

    adapter: str | None = Field(None, description="adapter name; null or absent for the base model", max_length=64)
    prompt: str = Field(..., min_length=1, description="raw prompt text (no chat template applied)")
    max_new_tokens: int = Field(128, ge=1, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    ignore_eos: bool = False
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    adapter: str | None
    text: str
    finish_reason: FinishReasonName
    usage: Usage


class StreamToken(BaseModel):
    id: int
    text: str


class StreamEvent(BaseModel):
    """One Server-Sent Event of a streamed generation: a token, or the final event (finish_reason and usage)."""

    id: str
    token: StreamToken | None = None
    finish_reason: StreamFinishReason | None = None
    usage: Usage | None = None
    error: str | None = Field(None, description="why the stream ended early (finish_reason timeout or error)")


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
