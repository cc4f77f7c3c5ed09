"""The tokenizer a GGUF file describes, built from its metadata: no tokenizer.json, no torch.

A GGUF carries its tokenizer the way llama.cpp reads it (`src/llama-vocab.cpp`):
`tokenizer.ggml.model` names the algorithm, `tokens` / `merges` / `scores` / `token_type` hold the
vocabulary, `pre` names the pre-tokenizer (only by name: the regexes live in llama.cpp's source, so
they are written down here, in `PRE_TOKENIZERS`), then the special token ids, the add-BOS/EOS flags
and the chat template. This module turns that into a `tokenizers.Tokenizer` wrapped in
`transformers.PreTrainedTokenizerFast`, so every caller sees the same kind of object a Hugging Face
folder gives (encode, decode, `apply_chat_template`).

- `gpt2`: byte-level BPE. Text is cut by the regexes llama.cpp runs for `pre`, in order, each match
  kept whole (a `Split(..., "isolated")` each), then mapped to the byte alphabet and merged by rank.
- `llama`: SentencePiece BPE with byte fallback (`<0xNN>` tokens), built as transformers' GGUF
  converter builds it (merges from the file, else recovered from the scores; spaces become `▁`)
  except for the prefix: when `add_space_prefix` says so (the default), a `▁` goes before every
  stretch of text between special tokens, as SentencePiece's dummy prefix and llama.cpp do.
- Tokens typed CONTROL (or UNKNOWN) become special added tokens, USER_DEFINED ones plain added
  tokens: both are matched whole in the text and never split, as llama.cpp matches them. Decoding
  with `skip_special_tokens` drops the first kind only.

Where this departs from transformers' own loader (`AutoTokenizer.from_pretrained(d, gguf_file=f)`),
it follows llama.cpp, the runtime GGUF files are made for, and with it the models' original
tokenizers:
- transformers splits with the GPT-2 regex alone when it has no regex for `pre` (`smollm`,
  `default`). SmolLM's own tokenizer.json isolates every digit first (`Digits(individual_digits=
  True)`, llama.cpp's `\\p{N}`), which shows where spaces meet a digit: `"a   1"` is `a`, `ĠĠĠ`,
  `1` for the model and llama.cpp, `a`, `ĠĠ`, `Ġ`, `1` for transformers.
- Llama 3's tokenizer.json takes a piece that is itself a token whole (`ignore_merges`, as llama.cpp
  does for the `llama-bpe` family); transformers merges it from bytes.
- SentencePiece: transformers' `Metaspace(prepend_scheme="first")` gives no `▁` prefix to text that
  already starts with a space (`"  hi"` loses a space on the way back) nor after a special token
  written in the text (`"<s>[INST]"`), and it ignores `add_space_prefix = false`.
- With no `add_bos_token` in the file, llama.cpp's default for the vocabulary holds (on for `llama`
  and the `llama-bpe` family), where transformers adds none for byte-level files.

Not here: other tokenizer models (`t5`, `bert`, `rwkv`, ...) and other `pre` types are refused by
name; `gguf_checkpoint.gguf_file` decides which file a model path names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxlora.errors import ModelLoadError
from jaxlora.gguf_checkpoint import open_gguf

# The original regexes of the models' tokenizer.json files; llama.cpp runs equivalent spellings
# (its regex engine has no `(?i:...)`, so it writes `'[sS]` for `(?i:'s)`).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level vocabulary cuts text before merging: llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`."""

    splits: tuple[str, ...]
    """Regexes applied in order; each cuts every piece so far into its matches and the text between."""
    ignore_merges: bool = False
    """A piece that is itself in the vocabulary is one token, whatever the merges say (Llama 3)."""
    add_bos: bool = False
    """llama.cpp's default for `add_bos_token` when the file does not set it."""


_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((QWEN2_SPLIT,))

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's fallback for files that name no pre-tokenizer.
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": PreTokenizer((GPT2_SPLIT,)),
    # SmolLM's tokenizer.json: Digits(individual_digits=True), then ByteLevel's GPT-2 regex.
    "smollm": PreTokenizer((r"\p{N}", GPT2_SPLIT)),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}

TOKENIZER_MODELS = ("gpt2", "llama")
"""The values of `tokenizer.ggml.model` this module builds: byte-level BPE and SentencePiece."""


@dataclasses.dataclass(frozen=True)
class GgufVocab:
    """The tokenizer half of a GGUF's metadata (keys `tokenizer.ggml.*`, `tokenizer.chat_template`)."""

    source: str
    """The file it came from, for error messages."""
    model: str
    pre: str
    """`default` when the file names none, as llama.cpp reads it."""
    tokens: list[str]
    token_types: list[int]
    """`gguf.TokenType` per token; all NORMAL when the file has none."""
    scores: list[float] | None
    merges: list[str] | None
    """`"left right"` strings, best first."""
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None
    """None when the file does not say; `build_tokenizer` then applies llama.cpp's default."""
    add_eos: bool
    add_space_prefix: bool
    """SentencePiece only: put `▁` before each stretch of text (llama.cpp's default: yes)."""
    chat_template: str | None


def read_vocab(path: str | Path) -> GgufVocab:
    """The tokenizer metadata of the GGUF at `path`."""
    fields = open_gguf(Path(path)).fields

    def get(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    model, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ModelLoadError(f"{path} has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens); "
                             "use a GGUF converted with its vocabulary, or a Hugging Face folder")
    return GgufVocab(
        source=str(path),
        model=model,
        pre=get("tokenizer.ggml.pre", "default"),
        tokens=tokens,
        token_types=get("tokenizer.ggml.token_type", [int(TokenType.NORMAL)] * len(tokens)),
        scores=get("tokenizer.ggml.scores"),
        merges=get("tokenizer.ggml.merges"),
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        add_bos=get("tokenizer.ggml.add_bos_token"),
        add_eos=get("tokenizer.ggml.add_eos_token", False),
        add_space_prefix=get("tokenizer.ggml.add_space_prefix", True),
        chat_template=get("tokenizer.chat_template"),
    )


def load_gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of the GGUF at `path` (see the module docstring for how it is built)."""
    return build_tokenizer(read_vocab(path))


def build_tokenizer(v: GgufVocab) -> PreTrainedTokenizerFast:
    if v.model not in TOKENIZER_MODELS:
        raise ModelLoadError(f"{v.source}: tokenizer.ggml.model {v.model!r} is not supported; "
                             f"supported: {', '.join(TOKENIZER_MODELS)}")
    vocab = {token: i for i, token in enumerate(v.tokens)}
    if len(vocab) != len(v.tokens):
        raise ModelLoadError(f"{v.source}: tokenizer.ggml.tokens lists the same token twice; the file is damaged")
    if v.model == "gpt2":
        backend, add_bos_default = _byte_level(v, vocab)
    else:
        backend, add_bos_default = _sentencepiece(v, vocab), True
    _add_typed_tokens(backend, v)

    add_bos = add_bos_default if v.add_bos is None else v.add_bos
    names = {"bos_token": v.bos_id, "eos_token": v.eos_id, "unk_token": v.unk_id, "pad_token": v.pad_id}
    for flag, name, on in (("add_bos_token", "bos_token", add_bos), ("add_eos_token", "eos_token", v.add_eos)):
        if on and names[name] is None:
            raise ModelLoadError(f"{v.source}: tokenizer.ggml.{flag} is true but the file names no {name} id")
    bad = [f"{name}={i}" for name, i in names.items() if i is not None and not 0 <= i < len(v.tokens)]
    if bad:
        raise ModelLoadError(f"{v.source}: special token ids outside the vocabulary of {len(v.tokens)} tokens: "
                             f"{', '.join(bad)}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{name: v.tokens[i] for name, i in names.items() if i is not None},
        add_bos_token=add_bos,
        add_eos_token=v.add_eos,
        chat_template=v.chat_template,
        # Decoding gives back exactly the text that was encoded; no "tidying" of spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )


def _byte_level(v: GgufVocab, vocab: dict[str, int]) -> tuple[Tokenizer, bool]:
    """Byte-level BPE with the pre-tokenizer `v.pre` names; also llama.cpp's add-BOS default for it."""
    pre = PRE_TOKENIZERS.get(v.pre)
    if pre is None:
        raise ModelLoadError(f"{v.source}: tokenizer.ggml.pre {v.pre!r} is not supported; "
                             f"supported: {', '.join(PRE_TOKENIZERS)}")
    if v.merges is None:
        raise ModelLoadError(f"{v.source}: a gpt2 (byte-level BPE) tokenizer needs tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in v.merges]
    try:
        model = models.BPE(vocab, merges, ignore_merges=pre.ignore_merges)
    except Exception as e:  # tokenizers raises its own Exception type for a merge that makes no token
        raise ModelLoadError(f"{v.source}: tokenizer.ggml.merges does not fit tokenizer.ggml.tokens: {e}") from e
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, pre.add_bos


def _sentencepiece(v: GgufVocab, vocab: dict[str, int]) -> Tokenizer:
    """SentencePiece BPE with byte fallback. The `▁` prefix comes from a normalizer, which runs on
    each stretch of text between special tokens and always prepends: SentencePiece's dummy prefix,
    as llama.cpp adds it (and Llama 2's tokenizer.json). transformers' `Metaspace(prepend_scheme=
    "first")` would skip it for text that already starts with a space and after a special token."""
    if v.merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in v.merges]
    elif v.scores is not None:
        merges = _merges_from_scores(v.tokens, v.scores, vocab)
    else:
        raise ModelLoadError(f"{v.source}: a llama (SentencePiece) tokenizer needs tokenizer.ggml.scores")
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if v.add_space_prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if v.add_space_prefix else []))
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: it joins the adjacent pair whose joined piece
    scores highest, so every split of a token into two tokens is a merge, ranked by the token's score
    (ties: longer left part first, then vocabulary order; transformers' `generate_merges` order)."""
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges.extend((left, right, score) for left, right in pairs)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_typed_tokens(backend: Tokenizer, v: GgufVocab) -> None:
    """Tokens llama.cpp matches whole in the text before tokenizing the rest: CONTROL and UNKNOWN
    (special: dropped by `skip_special_tokens`) and USER_DEFINED (kept in decoded text)."""
    special = {int(TokenType.CONTROL), int(TokenType.UNKNOWN)}
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(v.tokens, v.token_types) if kind in special])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(v.tokens, v.token_types) if kind == int(TokenType.USER_DEFINED)])
