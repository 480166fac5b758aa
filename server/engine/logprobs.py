"""Log-probabilities on the device: the chosen token's and the top-k alternatives', for generated tokens (the sampler)
and for prompt tokens (the engine, ``prompt_logprobs``).

Top lists are exact and deterministic: most probable first, ties broken by the lower token id, whatever the backend's
``topk`` does with ties (the sort key is the value's order-preserving integer image with the id below it).
"""

from collections.abc import Sequence

import torch

from server.engine.logprob import TokenLogprob

# Rows of prompt logits turned into log-probabilities at a time: with V = 49152 a slice holds ~25 MB of float32
# log-probs and, when ties need the exact pass, ~50 MB of int64 sort keys and ~75 MB of int32 temporaries.
PROMPT_SLICE_ROWS = 128
_LOW_BITS = 32  # the id goes below the value's 32 bits in a sort key
_ID_BASE = 2**31 - 1  # key's low part = _ID_BASE - id: a lower id sorts higher
_SPARE = 16  # candidates beyond k that ``top_ids(may_sync=True)`` takes, so most ties at the k-th value fit in them


def top_ids(logprobs: torch.Tensor, k: int, may_sync: bool = False) -> torch.Tensor:
    """The ids of each row's k largest entries: most probable first, ties by lower id (NaN rows: unspecified).

    logprobs [M, V] float32 (may hold -inf)    k in [0, V]
    may_sync: take the k + _SPARE best entries with a plain ``topk`` and order them exactly, and run the exact pass
    over the whole row only where ties at the k-th value reach past them; that costs one device->host sync and saves
    most of the exact pass (several times the cost of ``topk``) on large inputs. Without it: the exact pass on every
    row, no sync.
    returns [M, k] int64, same device.
    """
    vocab = logprobs.shape[1]
    if k == 0:
        return torch.empty(logprobs.shape[0], 0, dtype=torch.long, device=logprobs.device)
    everything = torch.arange(vocab, device=logprobs.device)
    if not may_sync:
        return _exact_top(logprobs, everything, k)
    values, ids = logprobs.topk(min(k + _SPARE, vocab), dim=-1)  # [M, c]; ties in any order
    best = _exact_top(values, ids, k)
    # Every entry equal to the k-th value is among the candidates when a smaller value follows it there (or there are
    # no others); NaN rows fail the test and take the exact pass.
    partial = (~(values[:, -1] < values[:, k - 1])).nonzero().squeeze(1) if values.shape[1] < vocab else None
    if partial is not None and partial.numel():
        best[partial] = _exact_top(logprobs[partial], everything, k)
    return best


def _exact_top(values: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The k best ``ids`` by (value descending, id ascending), by one ``topk`` over int64 keys: the value's
    order-preserving integer image, the id below it.

    values [M, c] float32    ids [M, c] or [c] int64 (each value's token id)    returns [M, k] int64."""
    bits = values.view(torch.int32)  # [M, c], no copy
    # Order-preserving image of a float: its bits when positive, minus its magnitude bits when negative (-0.0 -> 0).
    order = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits).long()  # [M, c]
    keys = order.bitwise_left_shift_(_LOW_BITS).add_(_ID_BASE - ids)  # no overflow: |order| < 2**31, low part < 2**32
    at = keys.topk(k, dim=-1).indices  # [M, k]
    return ids[at] if ids.dim() == 1 else ids.gather(1, at)


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int, may_sync: bool = False) -> torch.Tensor:
    """Each row's chosen token's log-probability and its top k, packed for one transfer to the host.

    logprobs [M, V] float32    tokens [M] int64 in [0, V)    k in [0, V]    may_sync: as ``top_ids``
    returns [M, 1 + 2k] float64: (logprob of tokens[i], k top ids, their k log-probs); read with ``unpack``.
    """
    chosen = logprobs.gather(1, tokens.unsqueeze(1))  # [M, 1]
    ids = top_ids(logprobs, k, may_sync)  # [M, k]
    return torch.cat([chosen.double(), ids.double(), logprobs.gather(1, ids).double()], dim=1)  # ids < 2**53: exact


def unpack(packed: Sequence[Sequence[float]], tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Host side of ``token_logprobs``: row i -> TokenLogprob(tokens[i], logprob, its first ks[i] alternatives)."""
    out = []
    for row, token, k in zip(packed, tokens, ks, strict=True):
        width = (len(row) - 1) // 2
        top = tuple((int(row[1 + j]), row[1 + width + j]) for j in range(k))
        out.append(TokenLogprob(token, row[0], top))
    return out


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprob]:
    """Entry j: ``log_softmax(logits[j])`` at ``targets[j]``, and its top k (the model's raw distribution).

    logits [L, V] any float dtype, L >= len(targets) (extra rows unused)    targets: ids in [0, V)    k in [0, 20]
    Computed PROMPT_SLICE_ROWS rows at a time, so the memory beyond ``logits`` stays small whatever L (~150 MB
    at V = 49152); the results come to the host in one transfer at the end (plus a one-value tie check per slice).
    """
    count = len(targets)
    assert logits.dim() == 2 and logits.shape[0] >= count, "one logits row per target"
    if count == 0:
        return []
    k = min(k, logits.shape[1])
    target = torch.tensor(list(targets), dtype=torch.long, device=logits.device)  # [T]
    packed = []
    for start in range(0, count, PROMPT_SLICE_ROWS):
        end = min(start + PROMPT_SLICE_ROWS, count)
        logprobs = torch.log_softmax(logits[start:end].float(), dim=-1)  # [S, V]
        packed.append(token_logprobs(logprobs, target[start:end], k, may_sync=True))
    return unpack(torch.cat(packed).tolist(), targets, [k] * count)
