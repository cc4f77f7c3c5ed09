"""Training data: JSONL rows -> tokenized examples -> fixed-shape, bucketed batches.

Row kinds (one per line):
    {"prompt": ..., "completion": ...}                  SFT: loss on the completion (+ EOS)
    {"messages": [{"role", "content"}, ...]}            SFT: loss on assistant turns only (OpenAI's
     (+ "tools": [...])                                 chat format, rendered with the chat template;
                                                        function calling: assistant `tool_calls`, `tool`
                                                        turns and the row's `tools`, as serving renders them)
    {"prompt": ..., "chosen": ..., "rejected": ...}     DPO pairs, or SFT on `chosen`
    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
     "non_preferred_output": [...]}                     OpenAI's preference format: DPO pairs after
                                                        the chat template, or SFT on the preferred

Everything is checked before any compute: the file must exist, hold at least one row, and every
row must be a JSON object of one kind with string fields; the first bad row is reported with its
line number. Sequences longer than `max_length` are refused the same way (never silently cut).

Batches are padded to a small set of lengths (powers of two up to max_length) so the training step
compiles once per bucket. The order is a seeded permutation per epoch, so batch i is the same in a
run that was interrupted and resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from jaxlora.errors import DataError
from jaxlora.tokenizer import render_chat
from jaxlora.tool_calls import detect_family, format_calls


@dataclasses.dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # the whole sequence
    loss_mask: tuple[int, ...]  # 1 where ids[t] is a trained (predicted) token


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # [B, T] int32 inputs
    targets: np.ndarray  # [B, T] int32 next tokens
    mask: np.ndarray  # [B, T] float32, 1 where the target is trained on
    tokens_in_rows: int = 0  # the rows' own tokens (what padding fills to [B, T] not counted)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "targets": self.targets, "mask": self.mask}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def jsonl_rows(lines: list[str], where: Callable[[int], str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; DataError at `where(n)` for one that is not a JSON object."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where(n)}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where(n)}: each line must be a JSON object")
        yield n, row


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    rows = list(jsonl_rows(lines, lambda n: f"{path}:{n}"))
    if not rows:
        raise DataError(f"{path} holds no rows: give one JSON object per line")
    return rows


def row_kind(row: dict, where: str) -> str:
    def need_str(*keys: str) -> None:
        for k in keys:
            if not isinstance(row.get(k), str):
                raise DataError(f"{where}: field {k!r} must be a string")

    def messages(msgs, field: str) -> list[dict]:
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: {field!r} must be a non-empty list")
        for i, m in enumerate(msgs):
            calls = m.get("tool_calls") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
                raise DataError(f"{where}: {field}[{i}] needs string 'role' and 'content' (content may be null "
                                "beside tool_calls)")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: {field}[{i}] has role {m['role']!r}; expected one of {list(ROLES)}")
            allowed = {"role", "content"} | ({"tool_calls"} if m["role"] == "assistant" else set()) | (
                {"tool_call_id", "name"} if m["role"] == "tool" else set())
            if set(m) - allowed:
                raise DataError(f"{where}: {field}[{i}] has fields {sorted(set(m) - allowed)} this trainer does not "
                                f"support for a {m['role']} message (give {sorted(allowed)})")
            for j, c in enumerate(calls or []):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(
                        f.get("arguments", "{}"), (str, dict)):
                    raise DataError(f"{where}: {field}[{i}].tool_calls[{j}] needs a 'function' with a string 'name' "
                                    "and 'arguments' (a JSON string or object)")
        return msgs

    if "messages" in row:
        if not any(m["role"] == "assistant" for m in messages(row["messages"], "messages")):
            raise DataError(f"{where}: the conversation has no assistant turn to learn from")
        tools = row.get("tools", [])
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
                for t in tools):
            raise DataError(f"{where}: 'tools' must be a list of {{\"type\": \"function\", \"function\": {{\"name\": "
                            "..., \"parameters\": {...}}}} objects")
        if set(row) - {"messages", "tools"}:
            raise DataError(f"{where}: fields {sorted(set(row) - {'messages', 'tools'})} are not supported beside "
                            "'messages' (give 'messages' and optionally 'tools')")
        return "chat"
    if "input" in row or "preferred_output" in row or "non_preferred_output" in row:
        if not isinstance(row.get("input"), dict) or "messages" not in row["input"]:
            raise DataError(f"{where}: 'input' must be an object with 'messages'")
        messages(row["input"]["messages"], "input.messages")
        for field in ("preferred_output", "non_preferred_output"):
            out = messages(row.get(field), field)
            if len(out) != 1 or out[0]["role"] != "assistant":
                raise DataError(f"{where}: {field!r} must hold exactly one assistant message")
        return "chat_preference"
    if "chosen" in row or "rejected" in row:
        need_str("prompt", "chosen", "rejected")
        return "preference"
    if "prompt" in row or "completion" in row:
        need_str("prompt", "completion")
        return "completion"
    raise DataError(f"{where}: expected 'prompt'+'completion', 'messages', 'prompt'+'chosen'+'rejected', or "
                    f"'input'+'preferred_output'+'non_preferred_output'; got fields {sorted(row)}")


ROLES = ("system", "user", "assistant", "tool")
PREFERENCE_KINDS = ("preference", "chat_preference")


def check_upload(data: bytes) -> dict[str, int]:
    """A training file's rows checked for shape at upload (what `load_dataset` would read, before
    tokenizing): how many rows of each kind; DataError naming the first bad line and what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"the file is not UTF-8 text (byte {e.start})") from None
    kinds: dict[str, int] = {}
    for n, row in jsonl_rows(text.splitlines(), lambda n: f"line {n}"):
        kind = row_kind(row, f"line {n}")
        kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        raise DataError("the file holds no rows: give one JSON object per line")
    return kinds


def _prompt_answer(tokenizer, prompt: str, answer: str) -> Example:
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(tuple(p + a), tuple([0] * len(p) + [1] * len(a)))


def _chat(tokenizer, messages: list[dict], where: str, tools: list[dict] | None = None) -> Example:
    """Renders the conversation with the chat template (and `tools`, as serving renders a request's);
    only assistant turns (and the EOS that closes each) are trained, a turn's calls written as the
    template's tool-call family writes them (`tool_calls.format_calls`: what serving parses back).
    Each assistant turn is appended after the template's rendering of everything before it, so the
    prompt side is exactly what serving will send."""
    ids: list[int] = []
    mask: list[int] = []
    family = detect_family(getattr(tokenizer, "chat_template", None))
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer(render_chat(tokenizer, messages[:i], tools), add_special_tokens=False)["input_ids"]
        if prefix[: len(ids)] != ids:
            raise DataError(f"{where}: the chat template renders earlier turns differently once later turns "
                            "follow, so turns cannot be masked; split the conversation into one row per reply")
        new_prompt = prefix[len(ids):]
        text = format_calls(family, m.get("content") or "", m["tool_calls"]) if m.get("tool_calls") else m["content"]
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += new_prompt + answer
        mask += [0] * len(new_prompt) + [1] * len(answer)
    return Example(tuple(ids), tuple(mask))


def _pair(tokenizer, row: dict, kind: str) -> tuple[Example, Example]:
    """(chosen, rejected) of a preference row; OpenAI's format is prompted through the chat template
    as serving's chat endpoint does."""
    if kind == "preference":
        return (_prompt_answer(tokenizer, row["prompt"], row["chosen"]),
                _prompt_answer(tokenizer, row["prompt"], row["rejected"]))
    prompt = tokenizer(render_chat(tokenizer, row["input"]["messages"], row["input"].get("tools")),
                       add_special_tokens=False)["input_ids"]
    family = detect_family(getattr(tokenizer, "chat_template", None))

    def answer(field: str) -> Example:
        m = row[field][0]
        text = format_calls(family, m.get("content") or "", m["tool_calls"]) if m.get("tool_calls") else m["content"]
        a = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Example(tuple(prompt + a), tuple([0] * len(prompt) + [1] * len(a)))

    return answer("preferred_output"), answer("non_preferred_output")


@dataclasses.dataclass(frozen=True)
class Dataset:
    examples: list[Example] | list[tuple[Example, Example]]  # pairs for DPO (chosen, rejected)
    sha256: str
    pairs: bool

    def __len__(self) -> int:
        return len(self.examples)


def load_dataset(path: str | Path, tokenizer, objective: str, max_length: int) -> Dataset:
    """Reads, validates and tokenizes every row before training starts."""
    path = Path(path)
    examples: list = []
    for n, row in read_rows(path):
        where = f"{path}:{n}"
        kind = row_kind(row, where)
        if objective == "dpo":
            if kind not in PREFERENCE_KINDS:
                raise DataError(f"{where}: DPO needs preference rows ('prompt', 'chosen' and 'rejected', or 'input', "
                                "'preferred_output' and 'non_preferred_output')")
            item = _pair(tokenizer, row, kind)
        elif kind == "chat":
            item = _chat(tokenizer, row["messages"], where, row.get("tools"))
        elif kind in PREFERENCE_KINDS:
            item = _pair(tokenizer, row, kind)[0]
        else:
            item = _prompt_answer(tokenizer, row["prompt"], row["completion"])
        for ex in item if isinstance(item, tuple) else (item,):
            if len(ex.ids) > max_length + 1:
                raise DataError(f"{where}: {len(ex.ids)} tokens, more than max_length={max_length} + 1; "
                                "shorten the row or raise max_length")
        examples.append(item)
    return Dataset(examples, sha256_file(path), pairs=objective == "dpo")


def buckets(max_length: int) -> list[int]:
    out, b = [], 16
    while b < max_length:
        out.append(b)
        b *= 2
    return out + [max_length]


def make_batch(examples: list[Example], max_length: int) -> Batch:
    longest = max(len(e.ids) - 1 for e in examples)
    T = next(b for b in buckets(max_length) if b >= longest)
    B = len(examples)
    tokens = np.zeros((B, T), np.int32)
    targets = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.float32)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        tokens[i, :n] = e.ids[:-1]
        targets[i, :n] = e.ids[1:]
        mask[i, :n] = e.loss_mask[1:]
    return Batch(tokens, targets, mask, sum(len(e.ids) for e in examples))


class BatchStream:
    """Micro-batch i of the run, reproducibly: epoch i // per_epoch, a seeded permutation per epoch."""

    def __init__(self, dataset: Dataset, batch_size: int, max_length: int, seed: int):
        self.dataset, self.batch_size, self.max_length, self.seed = dataset, batch_size, max_length, seed
        self.per_epoch = max(1, len(dataset) // batch_size)

    def tokens_before(self, i: int) -> int:
        """The rows' tokens in micro-batches 0..i-1 (what a resumed run had trained on)."""
        return sum(self[j].tokens_in_rows for j in range(i))

    def __getitem__(self, i: int) -> Batch:
        epoch, k = divmod(i, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        idx = [int(order[(k * self.batch_size + j) % len(order)]) for j in range(self.batch_size)]
        items = [self.dataset.examples[j] for j in idx]
        if self.dataset.pairs:  # chosen rows first, then their rejected twins: one forward for both
            return make_batch([c for c, _ in items] + [r for _, r in items], self.max_length)
        return make_batch(items, self.max_length)
