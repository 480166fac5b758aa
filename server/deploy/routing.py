"""Which multiplexed model id a request is routed by: the adapter it names, the base model's id, or none.

Ray Serve sends a request with a multiplexed model id to a replica that has that id loaded (our slot cache holds
the adapter there), so the id must be the adapter exactly as the engine keys it: a name, or a mixture's canonical
key (``mix:a*0.7+b*0.3``) whichever way the mixture was written. Requests that name no adapter (uploads, listings,
malformed bodies) get no id and go to any replica; the replica's own validation answers a malformed body.
"""

import json

from server.adapters.mixture_keys import MixtureError, MixturePart, canonical_key, parse_mixture_key, part_names

# The paths whose JSON body names what to generate with, and the field that names it.
_ADAPTER_FIELD = {
    "/v1/generate": "adapter",
    "/v1/completions": "model",
    "/v1/chat/completions": "model",
}


def routing_id(method: str, path: str, body: bytes, base_model_id: str) -> str | None:
    """The multiplexed model id of a request: the adapter key it generates with, ``base_model_id`` when it uses
    the base model, or None when it is not a generation request or its body cannot be read."""
    field = _ADAPTER_FIELD.get(path)
    if method != "POST" or field is None:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    value = payload.get(field)
    if value is None or value == base_model_id:
        return base_model_id
    if isinstance(value, dict) and field == "adapter":
        return _mixture_object(value)
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("mix:"):
        try:
            parts = parse_mixture_key(value)
            return canonical_key(parts or ())
        except MixtureError:
            return None
    return value


def adapter_names(model_id: str | None, base_model_id: str) -> list[str]:
    """The registered adapters a routing id depends on: its parts for a mixture, itself for a name."""
    if model_id is None or model_id == base_model_id:
        return []
    try:
        return part_names(model_id)
    except MixtureError:
        return []


def _mixture_object(value: dict[str, object]) -> str | None:
    """``{"mix": [{"name": ..., "weight": ...}, ...]}`` as its canonical key; None when malformed."""
    raw = value.get("mix")
    if not isinstance(raw, list):
        return None
    parts = []
    for item in raw:
        if not isinstance(item, dict):
            return None
        name, weight = item.get("name"), item.get("weight")
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, int | float):
            return None
        parts.append(MixturePart(name, float(weight)))
    try:
        return canonical_key(parts)
    except MixtureError:  # the replica answers the request with its 422
        return None
