"""Torch-free text handling shared by the engine and the router (braid.tokenizer):
text <-> token ids through the `tokenizers` library (tokenizer.json) and
incremental detokenization (text deltas for a growing list of ids).

In a request's life: the router (or the offline engine) encodes a text prompt
into ids before anything else, and turns each chunk of generated ids back into
a text delta on its way to the client."""
from __future__ import annotations

import os

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, model_path: str):
        path = os.path.join(model_path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_path}: no tokenizer.json; pass prompts as token ids")
        self._tok = _HFTokenizer.from_file(path)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids. Holds back output while the
    tail decodes to an incomplete UTF-8 sequence (U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, new_ids: list[int], final: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return ""
        if not text.startswith(self.emitted):
            # a merge changed earlier text; emit only what extends the common prefix
            common = os.path.commonprefix([text, self.emitted])
            self.emitted = common
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
