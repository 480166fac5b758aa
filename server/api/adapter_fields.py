"""From a request's adapter field (our ``adapter``, OpenAI's and vLLM's ``model``) to the engine's adapter key.

A weighted mixture is written ``{"mix": [{"name", "weight"}, ...]}`` in ``/v1/generate``, or as its key
``mix:<name>*<weight>+<name>*<weight>...`` wherever a model or adapter name is taken (``server.adapters.mixture``);
both become the same canonical key, which the engine serves as a virtual adapter. Malformed mixtures answer 422, a
part that is not registered 404 naming it; whether the parts can be mixed (same modules, plain LoRA, rank within the
adapter pool) is the engine's check (400)."""

from server.adapters.mixture import (
    MixtureError,
    MixturePart,
    canonical_key,
    is_mixture_key,
    parse_mixture_key,
)
from server.adapters.mixture_keys import part_names
from server.api.errors import ApiError
from server.api.schemas import AdapterMixture
from server.service import Service


def requested_adapter(adapter: str | AdapterMixture | None) -> str | None:
    """The engine's key for ``/v1/generate``'s ``adapter``: a name, a mixture object or a mixture key (422 when the
    mixture is malformed)."""
    if isinstance(adapter, AdapterMixture):
        return _canonical([MixturePart(p.name, p.weight) for p in adapter.mix], "adapter.mix")
    if is_mixture_key(adapter):
        assert adapter is not None
        return _parse(adapter, "adapter")
    return adapter


def model_adapter(service: Service, model: str | None) -> str | None:
    """The engine's key for an OpenAI or vLLM ``model``: None for the base model (its id, or no model at all, as
    vLLM takes it), an adapter name, or a mixture key; 404 when it names nothing registered."""
    if model is None or model == service.base_model_id:
        return None
    if is_mixture_key(model):
        key = _parse(model, "model")
        check_registered(service, key)
        return key
    if model in service.registry:
        return model
    raise ApiError(404, "not_found", f"model {model!r} does not exist; GET /v1/models lists the base and adapters")


def unregistered(service: Service, adapter: str | None) -> str | None:
    """The adapter (or the mixture's first part) that is not registered, else None."""
    if adapter is None:
        return None
    return next((name for name in part_names(adapter) if name not in service.registry), None)


def check_registered(service: Service, adapter: str | None) -> None:
    """404 naming the adapter, or the mixture's part, that is not registered."""
    missing = unregistered(service, adapter)
    if missing is not None:
        where = "" if missing == adapter else " (in the mixture)"
        raise ApiError(404, "not_found", f"adapter {missing!r}{where} is not registered")


def _parse(text: str, field: str) -> str:
    try:
        parts = parse_mixture_key(text)
    except MixtureError as exc:
        raise ApiError(422, "invalid_request", f"{field}: {exc}") from None
    assert parts is not None  # the caller saw the prefix
    return _canonical(parts, field)


def _canonical(parts: list[MixturePart] | tuple[MixturePart, ...], field: str) -> str:
    try:
        return canonical_key(parts)
    except MixtureError as exc:
        raise ApiError(422, "invalid_request", f"{field}: {exc}") from None
