"""Tokenizer loading, chat rendering and incremental detokenization.

The tokenizer is `transformers.AutoTokenizer` read from the model directory with local files only
(the generic `PreTrainedTokenizerFast` directly when tokenizer_config.json names it: the class
AutoTokenizer would pick, without the import of torch that AutoTokenizer's model registry makes
where torch is installed, seconds in every process that serves), or, when the model path names a
GGUF (`gguf_checkpoint.gguf_file`: a `.gguf` file, or a folder holding one `.gguf` and no
config.json), the one its metadata describes (`gguf_tokenizer.py`: built with `tokenizers`,
following llama.cpp where transformers' own GGUF loader does not). Both are
`PreTrainedTokenizerFast`s with the chat template set, so nothing below tells them apart.
Chat messages go through the tokenizer's own chat template when it has one, else through plain
`role: content` lines. `IncrementalDetokenizer` turns a stream of token ids into text deltas that
never end inside a UTF-8 character (a byte-level BPE token can hold half of one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jaxlora.errors import ModelLoadError
from jaxlora.gguf_checkpoint import gguf_file
from jaxlora.gguf_tokenizer import load_gguf_tokenizer
from jaxlora.tool_calls import prepare_messages, template_knows_tools

REPLACEMENT_CHAR = "\ufffd"
# tokenizer_config.json's tokenizer_class values that mean the generic fast tokenizer (v5's name, v4's).
_GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    model_dir = Path(model_dir)
    gguf = gguf_file(model_dir)
    if gguf is not None:
        return load_gguf_tokenizer(gguf)
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelLoadError(
            f"missing file {model_dir / 'tokenizer.json'}: the model directory needs a Hugging Face tokenizer "
            "(tokenizer.json / tokenizer_config.json), or the model path a .gguf file"
        )
    try:
        if _tokenizer_class(model_dir) in _GENERIC_CLASSES and (model_dir / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {e}") from e


def _tokenizer_class(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # AutoTokenizer reports what is wrong with the file
        return None


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                chat_template: str | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`, ending where the assistant's reply begins (unless
    `add_generation_prompt` is false), through `chat_template` (an adapter's own) or the tokenizer's.
    `tools` (OpenAI's function specs) and the calls and results in the messages go through the template
    when it renders tools itself, else in the default form (`tool_calls.prepare_messages`)."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        native = template_knows_tools(template)
        messages = prepare_messages(messages, tools, native)
        if native:
            return tokenizer.apply_chat_template(messages, tools=list(tools or []) or None, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, chat_template=template)
    if template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=template)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + (["assistant:"] if add_generation_prompt else []))


class IncrementalDetokenizer:
    """Feeds token ids one at a time and returns the text each one completes.

    Decodes a short window (the last emitted token(s) plus the new ones) rather than the whole
    sequence, and holds text back while it ends in U+FFFD, the mark of an incomplete UTF-8
    character. `"".join(deltas) + flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window re-decoded with each new token
        self._read_offset = 0  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (possibly an incomplete character)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class TextStream:
    """Token ids in, text deltas out: incremental detokenization plus OpenAI-style stop strings.

    Text that could be the beginning of a stop string is held back until it is clearly not one;
    when a stop string appears, the text before it is released and `stopped` turns true (the stop
    string itself is never emitted, as in OpenAI's API).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._detok.add(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._pending, self.stopped = self._pending[: min(hits)], "", True
            return out
        hold = 0 if final else max(
            (k for s in self._stop for k in range(min(len(s) - 1, len(self._pending)), 0, -1)
             if self._pending.endswith(s[:k])), default=0)
        out, self._pending = self._pending[: len(self._pending) - hold], self._pending[len(self._pending) - hold :]
        return out
