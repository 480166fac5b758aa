"""The prefix-cache namespace of each request: which requests may reuse each other's cached KV blocks.

Requests on the base model share one namespace. An adapter gets a namespace of its own (its K/V differ from the
base model's; see ``server.adapters.kv_sharing``), except one proven not to change any layer's K/V, which shares
the base model's. A namespace is fixed per adapter *upload*: ``forget`` (the adapter was deleted) makes the next
upload under the same name start a fresh one, so its requests never read blocks the deleted weights computed.

A weighted mixture (``server.adapters.mixture``) gets the namespace made of its parts' namespaces and weights: it
shares KV with no other mixture or adapter (except the base model's, when every part does: a mixture adapts exactly
its parts' modules), and a new upload of a part starts fresh.
"""

import itertools
from collections.abc import Callable, Hashable
from pathlib import Path

from server.adapters.archive import CONFIG_FILE
from server.adapters.kv_sharing import shares_base_kv
from server.adapters.mixture import parse_mixture_key
from server.adapters.peft_config import parse_lora_config
from server.model.lora_model import LoraModel

BASE_KEY: Hashable = ("base",)


class PrefixKeys:
    """adapter name -> prefix-cache key, computed once per upload from its ``adapter_config.json``."""

    def __init__(self, model: LoraModel, adapter_path: Callable[[str], Path]) -> None:
        self.model = model
        self.adapter_path = adapter_path
        self._keys: dict[str, Hashable] = {}
        self._uploads = itertools.count()

    def of(self, adapter: str | None) -> Hashable:
        """The namespace of requests on ``adapter`` (None: the base model)."""
        if adapter is None:
            return BASE_KEY
        parts = parse_mixture_key(adapter)
        if parts is not None:  # derived anew each time from the parts' (cached) namespaces: nothing to forget
            spaces = tuple(self.of(p.name) for p in parts)
            if all(space == BASE_KEY for space in spaces):
                return BASE_KEY
            return ("mixture", tuple(zip(spaces, (p.weight for p in parts), strict=True)))
        key = self._keys.get(adapter)
        if key is None:
            key = BASE_KEY if self._shares_base(adapter) else ("adapter", adapter, next(self._uploads))
            self._keys[adapter] = key
        return key

    def forget(self, adapter: str) -> None:
        self._keys.pop(adapter, None)

    def _shares_base(self, adapter: str) -> bool:
        try:
            spec = parse_lora_config((self.adapter_path(adapter) / CONFIG_FILE).read_bytes())
        except (OSError, ValueError, KeyError):  # unreadable now (being deleted): a namespace of its own is exact
            return False
        modules = self.model.modules
        targets = spec.targets(modules.module_names, modules.linear_names)
        return shares_base_kv(targets, int(self.model.model.config.num_hidden_layers))
