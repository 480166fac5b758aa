"""The answers of the OpenAI-compatible endpoints: completions, chat completions (whole and streamed), models."""

from typing import Literal

from pydantic import BaseModel, Field

# OpenAI's finish reasons that we produce (a request that ends early answers an error instead).
OpenAIFinishReason = Literal["stop", "length"]


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions log-probabilities, one entry per token (the echoed prompt's first, if any)."""

    tokens: list[str] = Field(description="each token id decoded alone")
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (nothing precedes it)")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="the most probable tokens at each position and the chosen one (up to logprobs + 1 entries)"
    )
    text_offset: list[int] = Field(description="where each token's text starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """A whole answer, or one chunk of a streamed one (``object`` is ``text_completion`` in both, as OpenAI has it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the UTF-8 bytes of ``token``")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: OpenAIFinishReason
    logprobs: ChatLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
