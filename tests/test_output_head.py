"""The chunked CPU output head gives the plain head's logits, for tied and untied weights, and installs once."""

import torch
from torch import nn

from server.model import output_head
from server.model.output_head import ChunkedOutputHead, use_chunked_head


def test_chunked_head_equals_the_plain_head(monkeypatch) -> None:
    monkeypatch.setattr(output_head, "CHUNK_ROWS", 7)  # chunks that do not divide the vocabulary
    torch.manual_seed(0)
    plain = nn.Linear(16, 50, bias=False).requires_grad_(False)  # frozen, as served
    chunked = ChunkedOutputHead(plain)
    for shape in [(1, 5, 16), (1, 1, 16), (3, 16)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(chunked(x), plain(x), atol=1e-6, rtol=1e-6)
        assert chunked(x).shape == plain(x).shape


def test_installed_once_on_cpu_and_shares_the_tied_weight(tiny_model_dir) -> None:
    from server.model.loader import load_base_model

    model = load_base_model(tiny_model_dir("llama"))
    head = model.get_output_embeddings()
    use_chunked_head(model)
    use_chunked_head(model)  # a second runner on the same model must not wrap the wrapper
    wrapped = model.get_output_embeddings()
    assert isinstance(wrapped, ChunkedOutputHead) and wrapped.inner is head
    assert wrapped.weight is head.weight
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        model.set_output_embeddings(head)
        torch.testing.assert_close(logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
