"""GGUF files (llama.cpp's single-file checkpoints) seen from the torch-free
side: finding the file behind a `--model` path, reading its metadata once per
process, and building a `tokenizers.Tokenizer` from the vocabulary it carries.

In a request's life: at startup the router (or the offline engine) builds its
tokenizer from the file here, then every text prompt is encoded with it; the
engine reuses `open_gguf` to read the same file's config and weights, so each
process parses the (large) header once.
"""
from __future__ import annotations

import functools
import os

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

GGUF_MAGIC = b"GGUF"

# llama.cpp token types (gguf.TokenType): which ids are special, which are raw bytes
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split patterns of the BPE pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`
# that differ from GPT-2's own (which ByteLevel applies when no pattern is given).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


class GGUFError(ValueError):
    """The GGUF file is unusable; the message names the file and what is wrong."""


def find_gguf(model_path: str) -> str | None:
    """The GGUF file behind `model_path`: the path itself when it is one, or the
    single *.gguf in a folder without a config.json; None for anything else."""
    if os.path.isfile(model_path):
        if model_path.lower().endswith(".gguf"):
            return model_path
        with open(model_path, "rb") as f:
            return model_path if f.read(4) == GGUF_MAGIC else None
    if not os.path.isdir(model_path) or os.path.isfile(os.path.join(model_path, "config.json")):
        return None
    found = sorted(n for n in os.listdir(model_path) if n.lower().endswith(".gguf"))
    if len(found) > 1:
        raise GGUFError(f"{model_path}: holds {len(found)} GGUF files ({', '.join(found)}); pass the one to load")
    return os.path.join(model_path, found[0]) if found else None


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime: float):
    import gguf  # numpy only; imported here so tokenizer.json users never pay for it

    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/struct errors for bad headers
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def open_gguf(path: str):
    """A `gguf.GGUFReader` for `path`, shared within this process (parsing the
    header of a 49k-token vocabulary takes seconds)."""
    return _open_cached(os.path.abspath(path), os.path.getmtime(path))


def metadata(reader, key: str, default=None):
    """One metadata value as plain Python (str, number, bool or list), or `default`."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _special_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control and user-defined tokens are matched whole in the raw text, as llama.cpp does."""
    return [
        AddedToken(tok, special=kind == _CONTROL, normalized=False)
        for tok, kind in zip(tokens, types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]


def _bpe_tokenizer(reader, tokens: list[str]) -> _HFTokenizer:
    """GPT-2 style byte-level BPE: the merges are in the file."""
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _SPLITS.get(metadata(reader, "tokenizer.ggml.pre", ""))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the pair whose joined piece scores highest; as
    ranked BPE merges: every split of each normal piece into two known pieces,
    ordered by the joined piece's score (then id, for a stable order)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(reader, tokens: list[str], types: list[int]) -> _HFTokenizer:
    """Llama style SentencePiece BPE with byte fallback: spaces become U+2581,
    a leading one is added unless the file says not to."""
    scores = [float(s) for s in metadata(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    unk = int(metadata(reader, "tokenizer.ggml.unknown_token_id", 0))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = _spm_merges(tokens, scores, types)
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata(reader, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + strip
    )
    return tok


def _add_bos(tok: _HFTokenizer, reader, tokens: list[str], default: bool) -> None:
    bos = metadata(reader, "tokenizer.ggml.bos_token_id")
    if bos is None or not metadata(reader, "tokenizer.ggml.add_bos_token", default):
        return
    name = tokens[int(bos)]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{name} $A", pair=f"{name} $A {name} $B", special_tokens=[(name, int(bos))]
    )


def gguf_tokenizer(path: str) -> _HFTokenizer:
    """The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.model`
    "gpt2" or "llama"); FileNotFoundError when the file carries none."""
    reader = open_gguf(path)
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind is None:
        raise FileNotFoundError(f"{path}: no tokenizer in the GGUF metadata; pass prompts as token ids")
    tokens = list(metadata(reader, "tokenizer.ggml.tokens", []))
    types = [int(t) for t in metadata(reader, "tokenizer.ggml.token_type", [_NORMAL] * len(tokens))]
    if kind == "gpt2":
        tok = _bpe_tokenizer(reader, tokens)
        _add_bos(tok, reader, tokens, default=False)
    elif kind == "llama":
        tok = _spm_tokenizer(reader, tokens, types)
        _add_bos(tok, reader, tokens, default=True)
    else:
        raise GGUFError(f"{path}: unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
    tok.add_special_tokens(_special_tokens(tokens, types))
    return tok


def gguf_chat_template(path: str) -> str | None:
    return metadata(open_gguf(path), "tokenizer.chat_template")


def gguf_special_ids(path: str) -> dict[str, int | None]:
    """bos/eos/unk/pad ids named in the metadata (None where absent)."""
    reader = open_gguf(path)
    out = {}
    for name in ("bos", "eos", "unknown", "padding", "eot"):
        value = metadata(reader, f"tokenizer.ggml.{name}_token_id")
        out[name] = None if value is None else int(value)
    return out
