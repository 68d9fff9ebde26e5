"""Torch-free text handling shared by the engine and the router (braid.tokenizer):
text <-> token ids through the `tokenizers` library (tokenizer.json, or the
vocabulary in a GGUF file's metadata: see gguf_vocab),
chat templates (see chat) and incremental detokenization (text deltas for a
growing list of ids).

In a request's life: the router (or the offline engine) encodes a text prompt
into ids before anything else, and turns each chunk of generated ids back into
a text delta on its way to the client."""
from __future__ import annotations

import os

from tokenizers import Tokenizer as _HFTokenizer

from braid.tokenizer.chat import ChatTemplateError, render_chat  # noqa: F401 - ChatTemplateError is re-exported
from braid.tokenizer.gguf_vocab import find_gguf, gguf_chat_template, gguf_special_ids, gguf_tokenizer


class Tokenizer:
    """Text <-> ids for a checkpoint: its tokenizer.json, or the vocabulary in
    its GGUF metadata when `model_path` is (or is a folder holding) a .gguf file."""

    def __init__(self, model_path: str):
        gguf_file = find_gguf(model_path)
        if gguf_file is not None:
            self._tok = gguf_tokenizer(gguf_file)
            self.chat_template = gguf_chat_template(gguf_file)
            ids = gguf_special_ids(gguf_file)
            self.bos_token_id, self.eos_token_id = ids["bos"], ids["eos"]
            return
        path = os.path.join(model_path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_path}: no tokenizer.json; pass prompts as token ids")
        self._tok = _HFTokenizer.from_file(path)
        self.chat_template, self.bos_token_id, self.eos_token_id = _tokenizer_config(model_path, self._tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens=False` for text that already carries them (a rendered chat template)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token as strings, as chat templates refer to them."""
        out = {}
        for name, tid in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id)):
            token = self._tok.id_to_token(tid) if tid is not None else None
            if token is not None:
                out[name] = token
        return out

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        """The checkpoint's chat template rendered over `messages` (a list of
        {"role", "content"}); ChatTemplateError (a ValueError) saying why when the
        model has no template or the template refuses them. Encode the result
        with `add_special_tokens=False`: the template writes its own."""
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens(), **extra)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _tokenizer_config(model_path: str, tok: _HFTokenizer) -> tuple[str | None, int | None, int | None]:
    """(chat template, bos id, eos id) from tokenizer_config.json, where present."""
    import json

    path = os.path.join(model_path, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None, None, None
    with open(path) as f:
        cfg = json.load(f)
    ids = {}
    for name in ("bos_token", "eos_token"):
        token = cfg.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        ids[name] = None
        for key, added in (cfg.get("added_tokens_decoder") or {}).items():
            if token is not None and added.get("content") == token:
                ids[name] = int(key)
        if ids[name] is None and isinstance(token, str):  # a token of the vocabulary, not an added one
            ids[name] = tok.token_to_id(token)
    template = cfg.get("chat_template")
    return (template if isinstance(template, str) else None), ids["bos_token"], ids["eos_token"]


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids, at a cost that does not grow
    with the output: each call decodes only a window, the ids of the last delta
    (context for merges and leading-space rules) plus the new ones, and emits what
    the window's text adds to the text of its context. Holds back output while the
    tail decodes to an incomplete UTF-8 sequence (U+FFFD); the window then grows
    until the character is complete."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0
        """First id of the window: ids before it are settled text."""
        self._read = 0
        """ids[:_read] are in the text emitted so far."""

    def add(self, new_ids: list[int], final: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(new_ids)
        context = self.tokenizer.decode(self.ids[self._start : self._read])
        text = self.tokenizer.decode(self.ids[self._start :])
        if text.endswith("\ufffd") and not final:
            return ""
        # a merge that rewrote the context's text cannot be taken back: emit what extends it
        delta = text[len(os.path.commonprefix([text, context])) :]
        self._start, self._read = self._read, len(self.ids)
        return delta
