"""vLLM's own endpoints, for clients and control planes built for vLLM (KServe, Kubernetes gateway LoRA syncers):
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (admin), ``POST /tokenize`` and
``POST /detokenize`` (inference).

Loading reads a PEFT folder from the server's disk (only under ``--lora-load-dir``, see ``lora_load_dir``) and
registers a copy exactly as an upload is registered: same validation, same answers to a refusal, and it survives a
restart. Unloading is ``DELETE /v1/adapters/{name}``. Their successes answer vLLM's plain-text messages."""

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from server.adapters.errors import AdapterError
from server.adapters.registry import AdapterExists, AdapterRecord, RegistryError, check_name
from server.api.adapter_fields import model_adapter
from server.api.auth import require_admin, require_inference
from server.api.errors import ApiError
from server.api.lora_load_dir import disabled, open_adapter_files
from server.api.prompts import ChatOptions, encode_chat, encode_prompt
from server.api.routes_adapters import as_api_error
from server.api.schemas import error_responses
from server.api.vllm_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
)
from server.service import Service

router = APIRouter()
_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "vLLM's success message", "content": {"text/plain": {"schema": {"type": "string"}}}}
}
_LOAD_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 503, 507)
_TOKEN_ERRORS = error_responses(400, 401, 404, 413, 422)


def _load(service: Service, body: LoadLoraAdapterRequest) -> AdapterRecord:
    allowed = service.settings.lora_load_dir
    assert allowed is not None
    with open_adapter_files(allowed, body.lora_path) as (config, weights):
        return service.registry.add_files(body.lora_name, config, weights)


@router.post(
    "/v1/load_lora_adapter",
    response_class=Response,  # no media type of its own: the errors stay JSON in the schema, 200 is text
    responses={**_TEXT, **_LOAD_ERRORS},
    dependencies=[Depends(require_admin)],
)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """Register the PEFT folder at ``lora_path`` (under ``--lora-load-dir``) as adapter ``lora_name``; it is
    validated against the base model and copied into the data directory, as an upload is."""
    service: Service = request.app.state.service
    if service.settings.lora_load_dir is None:
        raise disabled()
    try:
        check_name(body.lora_name)  # a bad or taken name is told before anything is read from disk
        if body.lora_name in service.registry:
            raise AdapterExists(f"adapter {body.lora_name!r} already exists; unload it first to replace it")
        await run_in_threadpool(_load, service, body)
    except (RegistryError, AdapterError) as exc:
        raise as_api_error(exc) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(
    "/v1/unload_lora_adapter",
    response_class=Response,  # no media type of its own: the errors stay JSON in the schema, 200 is text
    responses={**_TEXT, **error_responses(400, 401, 403, 404, 413, 422, 507)},
    dependencies=[Depends(require_admin)],
)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """``DELETE /v1/adapters/{lora_name}``: requests already running with it finish, new ones get 404."""
    service: Service = request.app.state.service
    try:
        await run_in_threadpool(service.delete_adapter, body.lora_name)
    except RegistryError as exc:
        raise as_api_error(exc) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _check_model(service: Service, model: str | None) -> None:
    """404 unless ``model`` is the base model, an adapter or a mixture of adapters (422 when malformed)."""
    model_adapter(service, model)


def _prompt_limit(service: Service) -> int:
    settings = service.settings
    return settings.max_prompt_tokens if settings.max_prompt_tokens is not None else settings.max_seq_len - 1


def _token_strs(service: Service, ids: list[int]) -> list[str]:
    strs = service.tokenizer.convert_ids_to_tokens(ids)
    return [strs] if isinstance(strs, str) else strs


def _decode(service: Service, ids: list[int]) -> str:
    text = service.tokenizer.decode(ids)
    assert isinstance(text, str)  # one sequence of ids decodes to one string
    return text


@router.post(
    "/tokenize", response_model=TokenizeResponse, responses=_TOKEN_ERRORS, dependencies=[Depends(require_inference)]
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt, or of a conversation rendered with the chat template, exactly as the completions
    endpoints compute them."""
    service: Service = request.app.state.service
    _check_model(service, body.model)
    messages = body.chat()
    if messages is not None:
        options = ChatOptions(body.add_generation_prompt, body.continue_final_message, bool(body.add_special_tokens))
        ids = await encode_chat(service, messages, options)
    else:
        assert body.prompt is not None
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await encode_prompt(service, body.prompt, add_special_tokens=add)
    if len(ids) > (limit := _prompt_limit(service)):
        raise ApiError(400, "invalid_request", f"the prompt has {len(ids)} tokens; the limit is {limit}")
    strs = _token_strs(service, ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=service.settings.max_seq_len, tokens=ids, token_strs=strs)


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=_TOKEN_ERRORS,
    dependencies=[Depends(require_inference)],
)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids (special tokens included, as vLLM decodes them)."""
    service: Service = request.app.state.service
    _check_model(service, body.model)
    settings, tokenizer = service.settings, service.tokenizer
    if len(body.tokens) > settings.max_seq_len:
        raise ApiError(400, "invalid_request", f"{len(body.tokens)} tokens; the limit is {settings.max_seq_len}")
    vocab = len(tokenizer)
    if outside := [t for t in body.tokens if not 0 <= t < vocab]:
        raise ApiError(400, "invalid_request", f"token ids must be in [0, {vocab}) (the tokenizer's vocabulary); got "
                       f"{', '.join(map(str, outside[:5]))}{' ...' if len(outside) > 5 else ''}")  # fmt: skip
    return DetokenizeResponse(prompt=await run_in_threadpool(_decode, service, body.tokens))
