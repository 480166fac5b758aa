"""Bodies of vLLM's own endpoints that we serve: dynamic adapter loading and ``/tokenize`` / ``/detokenize``.

As everywhere in this API, an unknown field is refused (400 ``unsupported_field``) rather than ignored; vLLM
accepts and ignores extras."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.openai_schemas import ChatMessage

# Options of the chat form of /tokenize: a prompt-form request that sets one of them is refused.
CHAT_ONLY = ("add_generation_prompt", "continue_final_message")


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(..., description="the adapter's name (as for uploads: letters, digits, '.', '_', '-')")
    lora_path: str = Field(..., description="absolute path of a PEFT save folder under the server's --lora-load-dir")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(..., description="the adapter to remove, however it was registered")


class TokenizeRequest(BaseModel):
    """vLLM's two forms in one body: ``prompt`` (plain text) or ``messages`` (rendered with the chat template)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        None, description="the base model's id, an adapter name or a mixture mix:...; all share one tokenizer"
    )
    prompt: str | None = Field(None, description="text to tokenize as a completions prompt is")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="a conversation to render and tokenize as a chat completions request is"
    )
    add_special_tokens: bool | None = Field(
        None, description="default: true with prompt (the tokenizer's BOS...), false with messages (the template's)"
    )
    add_generation_prompt: bool = Field(True, description="messages only: end with the assistant's turn opening")
    continue_final_message: bool = Field(False, description="messages only: leave the last message open")
    return_token_strs: bool = Field(False, description="also answer each token's vocabulary string")

    @model_validator(mode="after")
    def _one_form(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.prompt is not None and (chat_only := [f for f in CHAT_ONLY if f in self.model_fields_set]):
            raise ValueError(f"{', '.join(chat_only)} applies to messages only")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        return self

    def chat(self) -> list[dict[str, Any]] | None:
        """The messages as the chat template takes them; None for the prompt form."""
        return None if self.messages is None else [m.model_dump() for m in self.messages]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(..., description="the server's --max-seq-len")
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="with return_token_strs: each token's vocabulary entry")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        None, description="the base model's id, an adapter name or a mixture mix:...; all share one tokenizer"
    )
    tokens: list[int] = Field(..., description="token ids, each in [0, the tokenizer's vocabulary size)")


class DetokenizeResponse(BaseModel):
    prompt: str
