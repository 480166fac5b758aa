"""Incremental detokenization (byte-level and SentencePiece-like tokenizers) and stop strings while streaming."""

import json
import random
import time
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from loadtests.common.factories import WORDS, build_tokenizer
from server.engine.detokenizer import IncrementalDetokenizer, StopChecker

MULTIBYTE = "héllo wörld ÿes — ∑ 漢字 😀 ünïcode"
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer: Metaspace pre-tokenizer, BPE with byte fallback, decoder strips the leading space."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(500)]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _deltas(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], prompt_ids: Sequence[int] | None = None
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert detok.text == "".join(deltas)
    return deltas


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_multibyte_text_token_by_token(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert any(FFFD in tokenizer.decode([i]) for i in ids)  # some characters really span several tokens
    deltas = _deltas(tokenizer, ids)
    assert "".join(deltas) == _decode(tokenizer, ids) == MULTIBYTE
    assert not any(FFFD in d for d in deltas)


def test_random_sequences_match_full_decode(byte_level: PreTrainedTokenizerFast) -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(byte_level)) for _ in range(rng.randint(1, 40))]
        deltas = _deltas(byte_level, ids)
        full = _decode(byte_level, ids)
        assert "".join(deltas) == full
        if FFFD not in full:
            assert not any(FFFD in d for d in deltas)


def test_random_valid_texts_match_full_decode(sentencepiece: PreTrainedTokenizerFast) -> None:
    # Byte-fallback decoding is not self-synchronising on invalid bytes, so this one gets valid text only.
    rng = random.Random(1)
    pieces = [*WORDS, *MULTIBYTE.split(), "  ", "\n"]
    for _ in range(100):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        ids = sentencepiece.encode(text, add_special_tokens=False)
        deltas = _deltas(sentencepiece, ids)
        assert "".join(deltas) == _decode(sentencepiece, ids)
        assert not any(FFFD in d for d in deltas)


def test_special_tokens_are_skipped(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level.encode("hello world", add_special_tokens=False)
    ids = [byte_level.bos_token_id, *ids[:1], byte_level.eos_token_id, *ids[1:], byte_level.eos_token_id]
    assert "".join(_deltas(byte_level, ids)) == "hello world"


def test_prompt_context_does_not_leak(byte_level: PreTrainedTokenizerFast) -> None:
    prompt = byte_level.encode("<|im_start|>user\nhello world 漢<|im_end|>\n", add_special_tokens=False)
    generated = byte_level.encode(" yes please 😀", add_special_tokens=False)
    deltas = _deltas(byte_level, generated, prompt_ids=prompt)
    assert "".join(deltas) == _decode(byte_level, generated) == " yes please 😀"


def test_prompt_ending_inside_a_character_is_not_used(byte_level: PreTrainedTokenizerFast) -> None:
    whole = byte_level.encode("ok 漢", add_special_tokens=False)
    cut = next(n for n in range(len(whole) - 1, 0, -1) if _decode(byte_level, whole[:n]).endswith(FFFD))
    generated = byte_level.encode(" yes", add_special_tokens=False)
    assert "".join(_deltas(byte_level, generated, prompt_ids=whole[:cut])) == " yes"


def test_prompt_context_keeps_the_leading_space(sentencepiece: PreTrainedTokenizerFast) -> None:
    prompt = sentencepiece.encode("hello world", add_special_tokens=False)
    generated = sentencepiece.encode("hello yes please", add_special_tokens=False)[1:]  # "▁yes ▁please"
    assert "".join(_deltas(sentencepiece, generated)) == _decode(sentencepiece, generated) == "yes please"
    with_context = _deltas(sentencepiece, generated, prompt_ids=prompt)
    assert "".join(with_context) == " yes please"  # as in decode(prompt + generated), without the prompt itself


def test_flush_releases_a_trailing_incomplete_character(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level.encode("ab 漢", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(byte_level)
    streamed = "".join(detok.add(i) for i in ids)
    assert not streamed.endswith(FFFD)
    assert streamed + detok.flush() == _decode(byte_level, ids)
    assert detok.text.endswith(FFFD)


# --- stop strings -------------------------------------------------------------------------------------------------


def _stream_with_stops(chunks: Sequence[str], stops: Sequence[str]) -> tuple[list[str], str]:
    """Drive StopChecker the way the engine does: feed, then stream all but the holdback. -> (streamed, final).

    Streaming only ever appends, so ``"".join(streamed) == final`` also proves no earlier piece let out stop text.
    """
    checker = StopChecker(stops)
    text, streamed = "", list[str]()
    for chunk in chunks:
        text += chunk
        index = checker.feed(chunk)
        if index is not None:
            final = text[:index]
            streamed.append(final[len("".join(streamed)) :])
            return streamed, final
        streamed.append(text[len("".join(streamed)) : len(text) - checker.holdback])
    streamed.append(text[len("".join(streamed)) :])
    return streamed, text


def _holdback(stops: Sequence[str], text: str) -> int:
    checker = StopChecker(stops)
    assert checker.feed(text) is None
    return checker.holdback


def test_stop_spanning_two_tokens(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level.encode("the captain sails the sea", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_level)
    streamed, final = _stream_with_stops([detok.add(i) for i in ids], stops=["ain sai"])
    assert final == "the capt"
    assert "".join(streamed) == final


def test_earliest_of_several_stops() -> None:
    assert StopChecker(["world", "lo w", "o"]).feed("hello world") == 3
    assert StopChecker(["world", "lo w", "o"]).feed("hell") is None
    checker = StopChecker(["world", "o w"])
    assert checker.feed("hell") is None
    assert checker.feed("o world") == 4  # indices count the whole text; "o w" starts before "world" ends
    checker = StopChecker(["abcd", "bc"])
    assert checker.feed("a") is None
    assert checker.feed("bc") == 1  # "abcd" may still come, but "bc" is already there: stop at the first found


def test_holdback() -> None:
    assert _holdback(["world", "<|end|>"], "hello wor") == 3
    assert _holdback(["world", "<|end|>"], "hello <|en") == 4
    assert _holdback(["world", "<|end|>"], "hello") == 0
    assert _holdback(["aab"], "aaaa") == 2  # the KMP fallback keeps the overlap
    assert _holdback([], "anything") == 0
    checker = StopChecker(["world"])
    assert checker.feed("hello wo") is None and checker.holdback == 2
    assert checker.feed("x") is None and checker.holdback == 0  # the prefix broke off: stream it


def test_stop_matching_cost_does_not_grow_with_text_or_stop_length() -> None:
    """Four 100k-character stop strings: a long run of text that almost matches them, then a long run that matches
    nothing. The old holdback rescanned every prefix of every stop on every token (18 ms a token 1000 tokens into
    the second run, 50 ms at its end: minutes in all); a token now costs its own characters, plus one fallback walk
    when a near-match breaks off."""
    checker = StopChecker(["a" * 99_999 + c for c in "bcde"])
    start = time.perf_counter()
    for _ in range(10_000):
        assert checker.feed("a") is None
    assert checker.holdback == 10_000
    assert checker.feed("b") is None and checker.holdback == 0  # 10000 "a" + "b" starts no stop: nothing held
    for _ in range(10_000):
        assert checker.feed("b") is None
    assert checker.holdback == 0
    assert time.perf_counter() - start < 2.0  # measured ~0.1 s on a loaded 2-core machine


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])


def _reference_final(chunks: Sequence[str], stops: Sequence[str]) -> str:
    """Generation stops at the first chunk after which some stop string occurs; cut at the earliest such start."""
    text = ""
    for chunk in chunks:
        text += chunk
        starts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if starts:
            return text[: min(starts)]
    return text


def test_streamed_text_equals_final_text_fuzz() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if text else []
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        streamed, final = _stream_with_stops(chunks, stops)
        assert final == _reference_final(chunks, stops)
        assert "".join(streamed) == final
        assert not any(s in final for s in stops)
