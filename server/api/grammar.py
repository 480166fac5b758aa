"""A request's structured-output spec to the grammar the engine applies, without stalling the event loop.

Usage (in a route, after the body's structured-output fields became a ``StructuredOutputSpec``)::

    grammar = await compile_grammar(service, spec)  # ApiError 400 "invalid_request" for a spec that cannot compile
    handles = service.engine.submit_group(prompt_ids, adapter, params, grammar=grammar)

One compiled grammar serves every sequence of the request (each of ``n`` choices gets its own matcher inside the
engine) and later requests with the same spec (the compiler keeps a bounded LRU cache of them).

Compiling takes ~1-2 ms for a typical schema, more for a large one, and building the compiler for a tokenizer ~0.5 s
(once per process, on the first structured request): both run on a small pool of their own, like tokenising does
(``prompts``), so neither the event loop nor the default pool that runs the routes' key checks waits on them.
"""

import asyncio
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

from transformers import PreTrainedTokenizerBase

from server.api.errors import ApiError
from server.engine.structured_output import CompiledGrammar, GrammarCompiler, GrammarError, StructuredOutputSpec
from server.service import Service

_POOL = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="grammar")
_COMPILERS: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, GrammarCompiler]" = weakref.WeakKeyDictionary()
_BUILDING = threading.Lock()  # one compiler per tokenizer, even when the first requests arrive together


def _compiler(service: Service) -> GrammarCompiler:
    """The tokenizer's compiler, built on first use (pool thread). Its end-of-sequence tokens are the engine's, so
    a finished grammar allows exactly the tokens the engine stops on."""
    tokenizer = service.tokenizer
    with _BUILDING:
        compiler = _COMPILERS.get(tokenizer)
        if compiler is None:
            engine = service.engine
            compiler = GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_ids)
            _COMPILERS[tokenizer] = compiler
    return compiler


def _compile(service: Service, spec: StructuredOutputSpec) -> CompiledGrammar:
    return _compiler(service).compile(spec)


async def compile_grammar(service: Service, spec: StructuredOutputSpec) -> CompiledGrammar:
    """The grammar for ``spec``; ApiError(400, "invalid_request") naming the problem when it cannot be compiled
    (invalid JSON schema, a schema keyword or regex feature that is not supported, an empty choice list)."""
    try:
        return await asyncio.get_running_loop().run_in_executor(_POOL, _compile, service, spec)
    except GrammarError as exc:
        raise ApiError(400, "invalid_request", f"structured output: {exc}") from None
