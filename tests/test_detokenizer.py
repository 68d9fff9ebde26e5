"""Incremental detokenization (braid.tokenizer.IncrementalDetokenizer), against the
`tokenizers` library's decode of the whole output as the reference: the deltas,
joined, are exactly that text, whatever the chunking, with multi-byte characters
split across byte-level tokens never emitted half; and each call decodes only a
window of ids, not the whole output (the router relays long outputs chunk by chunk)."""
from __future__ import annotations

import os
import random

import pytest

from braid.engine.tiny import save_tokenizer
from braid.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = (
    "Once upon a time, in 2024, a naïve café served crème brûlée. 你好，世界！こんにちは 😀🚀👍🏽 "
    "def f(x):\n    return x ** 2  # square\n\n  spaces   and\ttabs. Привет мир. ∑∫√ ← → ©®™ "
) * 6


def _metaspace_folder(path) -> str:
    """A SentencePiece-style tokenizer (Metaspace pre-tokenizer and decoder, byte fallback
    off): its decoder strips the leading space of a decoded sequence's first token."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False))
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return str(path)


@pytest.fixture(scope="module", params=["tiny-bytelevel", "metaspace", "smollm2"])
def tokenizer(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("detok")
    if request.param == "tiny-bytelevel":
        save_tokenizer(str(root))
        return Tokenizer(str(root))
    if request.param == "metaspace":
        return Tokenizer(_metaspace_folder(root))
    from braid.engine.default_model import default_gguf_path
    from braid.engine.model_config import CheckpointError

    try:
        return Tokenizer(default_gguf_path())
    except CheckpointError as e:
        pytest.skip(f"{e} (scripts/setup.sh installs it)")


class _Counting:
    """The tokenizer, recording how many ids each decode call was given."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.sizes = tok, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tok.decode(ids)


@pytest.mark.parametrize("max_chunk", [1, 3, 8])
def test_deltas_join_to_the_whole_decode(tokenizer, max_chunk):
    ids = tokenizer.encode(TEXT)
    reference = tokenizer.decode(ids)
    rng = random.Random(max_chunk)
    counting = _Counting(tokenizer)
    detok = IncrementalDetokenizer(counting)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        deltas.append(detok.add(ids[i : i + n], final=i + n >= len(ids)))
        i += n
    assert "".join(deltas) == reference
    assert not any("\ufffd" in d for d in deltas)  # no half character ever reaches a client
    # each call decodes a window (the last delta's ids plus the new ones, wider while a run of
    # characters split over byte tokens is incomplete), never the whole output: the work is
    # linear in the output (the whole-output decode would sum to about n^2 / 2 / chunk ids)
    assert len(ids) > 200
    assert sum(counting.sizes) <= 8 * len(ids), (sum(counting.sizes), len(ids))
    assert max(counting.sizes) < len(ids) / 8, max(counting.sizes)


def test_without_a_tokenizer_there_is_no_text():
    assert IncrementalDetokenizer(None).add([1, 2, 3], final=True) == ""
