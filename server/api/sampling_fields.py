"""Request fields both APIs share on their way to ``SamplingParams``: token ids checked against the vocabulary,
``logit_bias`` as (id, bias) pairs, one seed per choice, the structured-output grammar."""

from collections.abc import Iterable, Mapping
from dataclasses import replace

from server.api.errors import ApiError
from server.api.grammar import compile_grammar
from server.engine.sampling_params import SamplingParams
from server.engine.structured_output import CompiledGrammar, StructuredOutputSpec
from server.service import Service

_SEEDS = 2**63  # SamplingParams' seed range: [0, 2**63)


def vocab_size(service: Service) -> int:
    """The model's vocabulary size: token ids are in [0, vocab_size)."""
    return service.engine.vocab_size


def check_token_ids(service: Service, ids: Iterable[int], field: str) -> None:
    """400 naming ``field`` for an id outside the vocabulary (the schema already refuses negative ones)."""
    vocab = vocab_size(service)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, "invalid_request", f"{field}: token id {bad} is not in the vocabulary [0, {vocab})")


def logit_bias_pairs(service: Service, bias: Mapping[str, float] | None) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` (OpenAI's shape; the schema checks the keys are decimal) as (id, bias) pairs."""
    if not bias:
        return ()
    pairs = tuple((int(token), value) for token, value in bias.items())
    check_token_ids(service, (t for t, _ in pairs), "logit_bias")
    if len({t for t, _ in pairs}) != len(pairs):  # "7" and "007"
        raise ApiError(400, "invalid_request", "logit_bias: a token id is given more than once")
    return pairs


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """``n`` choices' parameters: with a seed, choice i uses seed + i (wrapping at 2**63), as vLLM does, so choice i
    equals a single request with that seed; without one, each choice draws its own random seed."""
    if params.seed is None:
        return [params] * n
    return [params if i == 0 else replace(params, seed=(params.seed + i) % _SEEDS) for i in range(n)]


async def grammar_for(service: Service, spec: StructuredOutputSpec | None) -> CompiledGrammar | None:
    """The compiled grammar of ``spec`` (400 when it cannot be compiled); None for free text."""
    return None if spec is None else await compile_grammar(service, spec)
