"""The tokenizer built from a GGUF's metadata, against two references.

1. transformers' own GGUF tokenizer (`AutoTokenizer.from_pretrained(d, gguf_file=f)`), wherever it
   builds what the model's tokenizer is;
2. llama.cpp's algorithm, re-done here in plain Python (`llama_cpp_encode`): its regexes for each
   pre-tokenizer type, spelled as in its `src/llama-vocab.cpp`, applied one after the other, then
   byte-level BPE by merge rank. This is the reference where transformers ignores the pre-tokenizer
   a file names (SmolLM's `smollm` isolates digits; transformers does not) or Llama 3's
   `ignore_merges`.

The real SmolLM2 file is checked on a corpus of digits, Unicode, whitespace runs, code and special
tokens, and on its chat template; small files written here cover SentencePiece (`llama`), the other
pre-tokenizer types and the refusals.
"""

from __future__ import annotations

import json
import math

import gguf
import pytest
import regex
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from jaxlora.errors import ModelLoadError
from jaxlora.gguf_tokenizer import build_tokenizer, load_gguf_tokenizer, read_vocab
from jaxlora.tokenizer import IncrementalDetokenizer, load_tokenizer, render_chat

# --- the llama.cpp reference -------------------------------------------------------------------

# llm_tokenizer_bpe's regex_exprs, as llama.cpp spells them (without `(?i:...)`, without the GPT-2
# regex's last `|\s+`: llama.cpp keeps text no regex matches as a piece of its own anyway).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA_CPP_REGEXES = {
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "llama-bpe": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _LLAMA3_REST],
    "qwen2": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _LLAMA3_REST],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
LLAMA_CPP_IGNORE_MERGES = {"llama-bpe"}


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet byte-level vocabularies are written in)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_CHARS = _byte_chars()


def llama_cpp_split(text: str, regexes: list[str]) -> list[str]:
    """unicode_regex_split: each regex cuts every piece into its matches and the gaps between them."""
    pieces = [text]
    for rx in regexes:
        cut = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(rx, piece):
                cut += [piece[at:m.start()]] if m.start() > at else []
                cut += [m.group()] if m.end() > m.start() else []
                at = max(at, m.end())
            cut += [piece[at:]] if at < len(piece) else []
        pieces = cut
    return pieces


def llama_cpp_encode(text: str, tokens: list[str], merges: list[str], specials: list[str], pre: str) -> list[int]:
    """llama.cpp's byte-level BPE: special tokens matched whole first, then each piece of the rest
    merged pair by pair, lowest rank (then leftmost) first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    ids = []
    parts = regex.split("(" + "|".join(map(regex.escape, sorted(specials, key=len, reverse=True))) + ")", text) \
        if specials else [text]
    for part_no, part in enumerate(parts):
        if part_no % 2:
            ids.append(vocab[part])
            continue
        for piece in llama_cpp_split(part, LLAMA_CPP_REGEXES[pre]):
            word = "".join(BYTE_CHARS[b] for b in piece.encode("utf-8"))
            if pre in LLAMA_CPP_IGNORE_MERGES and word in vocab:
                ids.append(vocab[word])
                continue
            symbols = list(word)
            while len(symbols) > 1:
                best, i = min((rank.get((symbols[j], symbols[j + 1]), math.inf), j) for j in range(len(symbols) - 1))
                if best == math.inf:
                    break
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            ids += [vocab[s] for s in symbols]
    return ids


# --- the corpus --------------------------------------------------------------------------------

CORPUS = [
    "The year 2024 had 366 days; 1,000,000 is a million and 3.14159 is pi.",
    "Call 555-0100 or +44 20 7946 0958 before 12:30, ticket #A1B2C3.",
    "1234567890123456789012345678901234567890",
    "Le café crème coûte 3,50 € à Zürich; naïve façade, señor.",
    "日本語のテキストと中文字符，还有한국어 and Ελληνικά.",
    "Emoji: 😀🎉👍🏽 and a flag 🇫🇷, ZWJ 👩‍💻.",
    "tabs\tand\t\ttabs, spaces    here,\n\n\nnewlines\r\nand\u00a0nbsp",
    "    indented\n        more\n\t\tdone  \n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }  // C",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": 4.5e-3}}',
    "I'm sure they'll say it's fine, don't you think? WE'LL SEE. She'd've",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "text<|endoftext|>more <repo_name>x<file_sep>y",
    " leading and trailing  ",
    "",
]
# Two or more spaces before a digit: SmolLM's own tokenizer (and llama.cpp) cut the digit off first,
# so the spaces stay one piece ("ĠĠĠ"); transformers' GPT-2-only split leaves " 1" together and
# the spaces split as "ĠĠ", "Ġ". The model was trained on the first.
SPACES_BEFORE_DIGITS = [
    "a   1",
    "x = [1,  2,   3]",
    "    1. indented item\n    10. next",
    "col1    col2\n12      345",
]

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Hi there 😀"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Count:  1  2   3"}],
]


# --- the real file: SmolLM2-135M-Instruct (gpt2 model, pre "smollm") --------------------------


@pytest.fixture(scope="module")
def smollm(smollm2_gguf):
    """(vocab read from the file, our tokenizer, transformers' tokenizer for the same file)."""
    vocab = read_vocab(smollm2_gguf)
    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return vocab, build_tokenizer(vocab), ref


def _specials(vocab) -> list[str]:
    return [t for t, kind in zip(vocab.tokens, vocab.token_types) if kind != gguf.TokenType.NORMAL]


def test_smollm2_metadata_is_what_the_tests_assume(smollm):
    vocab, ours, _ = smollm
    assert (vocab.model, vocab.pre, len(vocab.tokens), len(vocab.merges)) == ("gpt2", "smollm", 49152, 48900)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.add_bos_token) == (1, 2, 2, False)
    assert len(ours) == 49152  # the special tokens are the file's own, not appended


@pytest.mark.parametrize("text", CORPUS + SPACES_BEFORE_DIGITS)
def test_smollm2_encodes_as_llama_cpp(smollm, text):
    vocab, ours, _ = smollm
    expected = llama_cpp_encode(text, vocab.tokens, vocab.merges, _specials(vocab), "smollm")
    assert ours(text)["input_ids"] == expected


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_encodes_as_transformers(smollm, text):
    _, ours, ref = smollm
    assert ours(text)["input_ids"] == ref(text)["input_ids"]


def test_smollm2_isolates_digits_where_transformers_does_not(smollm):
    """Documents the one disagreement: if transformers starts honouring `smollm`, these texts can
    join CORPUS above."""
    _, ours, ref = smollm
    assert ours.convert_ids_to_tokens(ours("a   1")["input_ids"]) == ["a", "ĠĠĠ", "1"]
    for text in SPACES_BEFORE_DIGITS:
        assert ours(text)["input_ids"] != ref(text)["input_ids"], text


def test_smollm2_special_tokens_stay_whole(smollm):
    _, ours, _ = smollm
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"):
        assert ours(f"a{token}b")["input_ids"] == ours("a")["input_ids"] + [ours.convert_tokens_to_ids(token)] \
            + ours("b")["input_ids"]
    assert ours("<|im_start|>")["input_ids"] == [1]


@pytest.mark.parametrize("text", CORPUS + SPACES_BEFORE_DIGITS)
def test_smollm2_decode_round_trips(smollm, text):
    _, ours, ref = smollm
    ids = ours(text)["input_ids"]
    assert ours.decode(ids) == text == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_smollm2_streams_without_splitting_characters(smollm):
    _, ours, _ = smollm
    text = CORPUS[5]
    detok = IncrementalDetokenizer(ours)
    assert "".join(detok.add(i) for i in ours(text)["input_ids"]) + detok.flush() == text


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chat_template_renders_as_transformers(smollm, messages):
    vocab, ours, ref = smollm
    prompt = render_chat(ours, messages)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert ours.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)
    # The last conversation has spaces before digits: its ids follow llama.cpp, not transformers.
    assert ours(prompt)["input_ids"] == llama_cpp_encode(prompt, vocab.tokens, vocab.merges, _specials(vocab), "smollm")


def test_load_tokenizer_takes_the_file_or_its_folder(smollm2_gguf, tmp_path):
    (tmp_path / smollm2_gguf.name).symlink_to(smollm2_gguf)
    for path in (smollm2_gguf, tmp_path):
        tok = load_tokenizer(path)
        assert tok("<|im_start|>user\n12")["input_ids"] == [1, 4093, 198, 33, 34]


# --- small files written here ------------------------------------------------------------------


def write_gguf(path, model: str, tokens: list[str], types: list[int], **keys):
    """A GGUF holding only tokenizer metadata (and the architecture transformers' reader wants)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in keys.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path):
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


CONTROL, USER, NORMAL = (int(t) for t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.NORMAL))
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
BPE_TYPES = [CONTROL, CONTROL, CONTROL, USER]
# A token no merge reaches: only Llama 3's ignore_merges (llama.cpp's llama-bpe) encodes " qqqq" as it.
WHOLE_ONLY = "Ġqqqq"
TRAINING_TEXT = [
    "x = 100  y = 2000   z = 30000\n", "for i in range(10):\n    total += i * 42\n", "a   1  22   333\n",
    "phone 555 0100  and  7946 0958\n", "I'm sure they'll, don't, WE'RE\n", "\t\tindent\n\n\nlines\n",
    "café naïve 日本語 😀\n", "    return 12345678\n", "[1,  2,   3,    4]\n", "$100 +200 <=300 ^4 ~5 |6\n",
] * 3


@pytest.fixture(scope="module")
def byte_level_vocab():
    """A small byte-level BPE trained with no pre-tokenizer at all, so its merges cross every
    boundary a pre-tokenizer could draw (spaces+digits, digit runs, punctuation+letters)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=700, special_tokens=BPE_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + [WHOLE_ONLY]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, BPE_TYPES + [NORMAL] * (len(tokens) - len(BPE_TYPES)), merges


BPE_TEXTS = TRAINING_TEXT[:10] + CORPUS + SPACES_BEFORE_DIGITS + ["user<think>x  1</think><|im_end|>"]


def _byte_level_file(tmp_path, byte_level_vocab, pre, **keys):
    tokens, types, merges = byte_level_vocab
    return write_gguf(tmp_path / f"{pre}.gguf", "gpt2", tokens, types, tokenizer_pre=pre, token_merges=merges,
                      eos_token_id=2, **keys)


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_REGEXES))
def test_byte_level_pre_types_encode_as_llama_cpp(tmp_path, byte_level_vocab, pre):
    tokens, _, merges = byte_level_vocab
    ours = load_gguf_tokenizer(_byte_level_file(tmp_path, byte_level_vocab, pre, add_bos_token=False))
    for text in BPE_TEXTS + [" qqqq"]:
        assert ours(text)["input_ids"] == llama_cpp_encode(text, tokens, merges, BPE_SPECIALS, pre), text
        assert ours.decode(ours(text)["input_ids"]) == text


def test_the_pre_types_differ_on_this_corpus(tmp_path, byte_level_vocab):
    """Without this, the test above could pass with one pre-tokenizer for all."""
    encodings = set()
    for pre in LLAMA_CPP_REGEXES:
        tok = load_gguf_tokenizer(_byte_level_file(tmp_path, byte_level_vocab, pre, add_bos_token=False))
        encodings.add(tuple(tuple(tok(text)["input_ids"]) for text in BPE_TEXTS))
    assert len(encodings) == len(LLAMA_CPP_REGEXES)


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_byte_level_agrees_with_transformers_where_it_honours_pre(tmp_path, byte_level_vocab, pre):
    path = _byte_level_file(tmp_path, byte_level_vocab, pre, add_bos_token=False, chat_template="{{ messages }}")
    ours, ref = load_gguf_tokenizer(path), transformers_gguf(path)
    for text in BPE_TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    assert set(ours.all_special_tokens) == set(ref.all_special_tokens)
    ids = ours("a<think>b<|im_end|>")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True) == "a<think>b"
    # Llama 3 keeps a piece that is a token whole (tokenizer.json's ignore_merges, llama.cpp's
    # llama-bpe); transformers' GGUF loader does not, so only the llama.cpp reference covers it.
    if pre == "llama-bpe":
        assert ours.convert_ids_to_tokens(ours(" qqqq")["input_ids"]) == [WHOLE_ONLY]
        assert ref(" qqqq")["input_ids"] != ours(" qqqq")["input_ids"]


@pytest.mark.parametrize(("pre", "keys", "bos"), [
    ("llama-bpe", {}, True),  # llama.cpp's default for the Llama 3 family
    ("gpt-2", {}, False),
    ("llama-bpe", {"add_bos_token": False}, False),  # the file's word wins
    ("gpt-2", {"add_bos_token": True}, True),
])
def test_add_bos_follows_the_file_then_llama_cpp(tmp_path, byte_level_vocab, pre, keys, bos):
    tok = load_gguf_tokenizer(_byte_level_file(tmp_path, byte_level_vocab, pre, bos_token_id=0, **keys))
    assert (tok("hi")["input_ids"][0] == 0) is bos
    assert tok("hi", add_special_tokens=False)["input_ids"][0] != 0


@pytest.fixture(scope="module")
def spm_vocab():
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces scored as
    SentencePiece scores BPE pieces (the later a merge was learned, the lower), plus a user-defined
    token. Learned with a Metaspace BPE so the pieces are ones merges can reach."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<tool>"]
    types = [int(gguf.TokenType.UNKNOWN), CONTROL, CONTROL] + [int(gguf.TokenType.BYTE)] * 256 \
        + [NORMAL] * len(pieces) + [USER]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    return tokens, types, scores


def llama_cpp_spm_encode(text: str, tokens: list[str], scores: list[float], specials: list[str],
                         add_space_prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece BPE (llm_tokenizer_spm_session): special tokens matched whole first;
    in each stretch of text between them spaces become ▁, with one put in front when
    add_space_prefix; then the adjacent pair whose joined piece is a token with the highest score
    (then the leftmost) is joined until none is; a piece that is no token is spelled as its UTF-8
    bytes (<0xNN>)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = []
    for part_no, part in enumerate(regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text)):
        if part_no % 2:
            ids.append(vocab[part])
            continue
        if not part:
            continue
        symbols = list(("▁" if add_space_prefix else "") + part.replace(" ", "▁"))
        while True:
            pairs = [(-scores[vocab[a + b]], j) for j, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in vocab]
            if not pairs:
                break
            _, j = min(pairs)
            symbols[j:j + 2] = [symbols[j] + symbols[j + 1]]
        ids += [i for s in symbols for i in ([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])]
    return ids


SPM_SPECIALS = ["<unk>", "<s>", "</s>", "<tool>"]
SPM_TEXTS = BPE_TEXTS[:10] + CORPUS[:12] + SPACES_BEFORE_DIGITS + ["  two leading spaces", "Ω≠✓"]
SPM_WITH_SPECIALS = ["call <tool> now</s><s> again", "<s>[INST] hi [/INST]", "a</s>b"]


def _sentencepiece_file(tmp_path, spm_vocab, **keys):
    tokens, types, scores = spm_vocab
    return write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, token_scores=scores, bos_token_id=1,
                      eos_token_id=2, unk_token_id=0,
                      chat_template="{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}", **keys)


@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_sentencepiece_encodes_as_llama_cpp(tmp_path, spm_vocab, add_space_prefix):
    tokens, _, scores = spm_vocab
    ours = load_gguf_tokenizer(_sentencepiece_file(tmp_path, spm_vocab, add_space_prefix=add_space_prefix))
    for text in SPM_TEXTS + SPM_WITH_SPECIALS:
        ids = ours(text)["input_ids"]
        # BOS: the file has no add_bos_token, and llama.cpp adds it to a llama vocabulary by default.
        assert ids == [1] + llama_cpp_spm_encode(text, tokens, scores, SPM_SPECIALS, add_space_prefix), text
    for text in SPM_TEXTS:
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text
    byte_ids = ours("Ω", add_special_tokens=False)["input_ids"]
    assert ours.convert_ids_to_tokens(byte_ids)[-2:] == ["<0xCE>", "<0xA9>"]  # byte fallback, not <unk>
    assert ours.convert_ids_to_tokens(ours("<tool>", add_special_tokens=False)["input_ids"]) == ["<tool>"]


def test_sentencepiece_agrees_with_transformers_where_it_adds_the_prefix(tmp_path, spm_vocab):
    """transformers' GGUF loader builds this file's tokenizer with `Metaspace(prepend_scheme="first")`,
    which puts the ▁ prefix only at the very start and only if the text does not already begin with a
    space. SentencePiece (`add_dummy_prefix`), llama.cpp and Llama 2's tokenizer.json put it before
    every stretch of text: the two agree on text that neither starts with a space nor holds a
    special token. (transformers also reads no add_space_prefix = false, hence the default here.)"""
    path = _sentencepiece_file(tmp_path, spm_vocab)
    ours, ref = load_gguf_tokenizer(path), transformers_gguf(path)
    agreed = [t for t in SPM_TEXTS + CORPUS if not t.startswith(" ") and not any(s in t for s in SPM_SPECIALS)]
    assert len(agreed) > 20
    for text in agreed:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for text in ("  two leading spaces", "a</s>b"):
        assert ours(text)["input_ids"] != ref(text)["input_ids"], text
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(ours, messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- refusals and paths ------------------------------------------------------------------------


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path, byte_level_vocab):
    path = _byte_level_file(tmp_path, byte_level_vocab, "tekken-9")
    with pytest.raises(ModelLoadError, match=r"tokenizer.ggml.pre 'tekken-9' is not supported; supported: .*smollm"):
        load_gguf_tokenizer(path)


def test_unknown_tokenizer_model_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [CONTROL, NORMAL])
    with pytest.raises(ModelLoadError, match=r"tokenizer.ggml.model 'bert' is not supported; supported: gpt2, llama"):
        load_gguf_tokenizer(path)
