"""Which adapters leave the base model's K/V untouched, so their requests may reuse the base model's cached prefixes.

Prefix caching keys cached KV blocks by the adapter that computed them, because a LoRA delta on any module that
runs *before* a layer's ``k_proj``/``v_proj`` changes that layer's keys and values: layer ``l``'s K/V are computed from
the residual stream that every earlier layer's attention output (``o_proj``) and MLP wrote into. So an adapter on the
MLP or on ``q_proj``/``o_proj`` alone changes K/V of every later layer, and sharing the base model's blocks with it
would be a wrong answer that looks right (``tests/model/test_kv_sharing.py`` shows it on a real forward pass).

What is exact: an adapter whose every target sits in the *last* decoder layer (or after it, e.g. ``lm_head``) and is
not that layer's ``k_proj``/``v_proj`` cannot change any layer's K/V. Those adapters share the base model's prefixes;
every other adapter gets prefixes of its own. Torch-free.
"""

import re
from collections.abc import Iterable

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_KV_PROJECTIONS = ("k_proj", "v_proj")
_AFTER_THE_LAYERS = ("lm_head",)  # modules that run after every decoder layer


def shares_base_kv(target_modules: Iterable[str], num_layers: int) -> bool:
    """True when LoRA on ``target_modules`` (full module names) leaves the K/V of all ``num_layers`` layers equal to
    the base model's. Conservative: a name whose layer cannot be read counts as changing K/V."""
    last = num_layers - 1
    for name in target_modules:
        if name.split(".")[-1] in _AFTER_THE_LAYERS:
            continue
        found = _LAYER.search(name)
        if found is None or int(found.group(1)) != last or name.split(".")[-1] in _KV_PROJECTIONS:
            return False
    return True
