"""Tool calling: how the tools reach the prompt, the grammar that forces a call, and the parser that
finds the calls in what the model wrote.

    FAMILIES, detect_family(chat_template)     the call format a model was trained on
    prepare_messages(messages, tools, native)  messages (with calls and results) as a template takes them
    call_grammar(family, tools, ...)           the grammar of one call, or of one or more (llguidance lark)
    CallParser(family)                         text in, content and tool-call events out (streaming or whole)

The families, by what the model writes:
    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call (Hermes,
                 Qwen 2/2.5/3, and the default: a template that knows no tools gets them listed in
                 its system message and asked for in this form)
    llama3_json  {"name": ..., "parameters": {...}} as the whole answer, calls joined by ";" (Llama 3.1+
                 JSON tool calling; `<|python_tag|>` before it is dropped)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
The family is an app option (`tool_parser`), detected from the chat template when left to `auto`.

The parser is one state machine for both ways an answer leaves: a stream feeds it deltas, a whole
answer feeds it once; so a stream's tool-call deltas reassemble into exactly the calls the whole
answer has. A call leaves as two events, its id and name first, then its arguments (a JSON string),
once the call's text is complete; text that turns out not to be a call (invalid JSON, an unknown
shape) is content after all.

What it deliberately does not do: HTTP shapes (`serve_app/openai_api.py`), tokenization, or decide
whether a call is made (`tool_choice` is the serving layer's, enforced through `call_grammar`).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence

from jaxlora.grammar import WHITESPACE

FAMILIES = ("hermes", "llama3_json", "mistral")


def detect_family(chat_template: str | None) -> str:
    """The call format a chat template asks for (hermes where it names none)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether the template renders `tools` itself (it reads the variable); else the default applies."""
    return bool(chat_template) and "tools" in chat_template


def _function(tool: Mapping) -> Mapping:
    return tool["function"] if "function" in tool else tool


def default_tools_prompt(tools: Sequence[Mapping]) -> str:
    """What a template without tool support gets in its system message: the functions as JSON, one
    a line, and how to call them (the hermes form)."""
    listing = "\n".join(json.dumps(dict(_function(t))) for t in tools)
    return (f"You may call these functions, listed one JSON object a line:\n<tools>\n{listing}\n</tools>\n"
            "To call one, answer with <tool_call>\n{\"name\": <its name>, \"arguments\": <a JSON object>}\n"
            "</tool_call> for each call.")


def _arguments(raw) -> dict:
    """A call's arguments as the template takes them: a dict (OpenAI's history holds a JSON string)."""
    if isinstance(raw, str):
        try:
            value = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {"_raw": raw}  # kept visible to the model rather than dropped
        return value if isinstance(value, dict) else {"_value": value}
    return dict(raw or {})


def prepare_messages(messages: Sequence[Mapping], tools: Sequence[Mapping] | None, native: bool) -> list[dict]:
    """The messages as the chat template takes them. `native` (the template renders tools itself):
    assistant calls get their arguments as dicts (Hugging Face's convention), everything else as
    given. Otherwise the default: the tools described in the system message (prepended to the first
    one, or one of its own), each assistant call written out in the hermes form after the
    assistant's text, and each tool result as a user turn inside <tool_response> tags."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls") or []
        if native:
            if calls:
                m["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": _arguments(c["function"].get("arguments"))}}
                                   for c in calls]
            out.append(m)
            continue
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
            continue
        if calls:
            m = {"role": m["role"], "content": format_calls("hermes", m.get("content") or "", calls)}
        else:
            m = {"role": m["role"], "content": m.get("content") or ""}
        out.append(m)
    if tools and not native:
        prompt = default_tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def format_calls(family: str, content: str, calls: Sequence[Mapping]) -> str:
    """An assistant turn's text with its calls (OpenAI's `tool_calls` entries) written as `family`
    writes them: what a model trained on it produces, and what `CallParser` reads back."""
    pairs = [(c["function"]["name"], _arguments(c["function"].get("arguments"))) for c in calls]
    if family == "hermes":
        blocks = [f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in pairs]
        return "\n".join(filter(None, [content, *blocks]))
    if family == "llama3_json":
        return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in pairs)
    if family == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in pairs])
    raise ValueError(f"unknown tool call family {family!r}; one of {', '.join(FAMILIES)}")


def _call_schema(family: str, tools: Sequence[Mapping]) -> dict:
    """The JSON of one call to any of `tools`, in `family`'s keys."""
    key = "parameters" if family == "llama3_json" else "arguments"
    options = []
    for t in tools:
        f = _function(t)
        params = f.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}  # none
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, key: params},
                        "required": ["name", key], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return schema | {"x-guidance": {"whitespace_pattern": WHITESPACE, "lenient": False}}


def call_grammar(family: str, tools: Sequence[Mapping], parallel: bool = True,
                 special_ids: Mapping[str, int] | None = None) -> str:
    """The grammar (llguidance's lark) of an answer that is exactly one call to one of `tools`
    (`parallel` false), or one or more. A marker that is a special token of the vocabulary
    (`special_ids`: text -> id) is matched as that token, not as its spelling."""
    special_ids = special_ids or {}

    def literal(text: str) -> str:
        return f"<[{special_ids[text]}]>" if text in special_ids else json.dumps(text)

    call = f"%json {json.dumps(_call_schema(family, tools))}"
    newline = json.dumps("\n")
    if family == "hermes":
        more = f" ({newline} call)*" if parallel else ""
        rules = (f"start: call{more}\n"
                 f"call: {literal('<tool_call>')} {newline} body {newline} {literal('</tool_call>')}\n"
                 f"body: {call}\n")
    elif family == "llama3_json":
        more = ' ("; " body)*' if parallel else ""
        rules = f"start: body{more}\nbody: {call}\n"
    elif family == "mistral":
        array = {"type": "array", "items": _call_schema(family, tools), "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        rules = f"start: {literal('[TOOL_CALLS]')} calls\ncalls: %json {json.dumps(array)}\n"
    else:
        raise ValueError(f"unknown tool call family {family!r}; one of {', '.join(FAMILIES)}")
    return _lark(rules)


def _lark(rules: str) -> str:
    from jaxlora.grammar import _llguidance

    return _llguidance().LLMatcher.grammar_from_lark(rules)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it


@dataclasses.dataclass(frozen=True)
class CallEvent:
    """A piece of a stream: content text, or a call's start (id and name) or its arguments."""

    index: int  # the call's place among the answer's calls (content: -1)
    content: str = ""
    call: ToolCall | None = None  # on the start event
    arguments: str | None = None  # on the arguments event


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallParser:
    """Feeds the answer's text (`feed`, then `finish`) and returns the events it completes: content
    as soon as it cannot be the start of a call, each call once its text is complete."""

    _MARKERS = {"hermes": ("<tool_call>", "</tool_call>")}

    def __init__(self, family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown tool call family {family!r}; one of {', '.join(FAMILIES)}")
        self.family = family
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._space = ""  # whitespace held until more content follows (none is sent around calls)
        self._in_call = False
        self._whole = family != "hermes"  # decided once the answer's first non-space text is seen
        self._decided = family == "hermes"

    def feed(self, text: str) -> list[CallEvent]:
        self._buf += text
        if self.family == "hermes":
            return self._hermes(final=False)
        return self._json_answer(final=False)

    def finish(self) -> list[CallEvent]:
        if self.family == "hermes":
            return self._hermes(final=True)
        return self._json_answer(final=True)

    def _content(self, text: str) -> list[CallEvent]:
        """Content as it comes, but trailing whitespace held until more content follows: whitespace
        around calls is never sent, however the text was cut."""
        body = text.rstrip()
        if not body:
            self._space += text
            return []
        out, self._space = self._space + body, text[len(body):]
        return [CallEvent(-1, content=out)]

    def _call(self, name: str, arguments) -> list[CallEvent]:
        call = ToolCall(new_call_id(), name, json.dumps(arguments))
        self.calls.append(call)
        index = len(self.calls) - 1
        return [CallEvent(index, call=call), CallEvent(index, arguments=call.arguments)]

    def _hermes(self, final: bool) -> list[CallEvent]:
        start, end = self._MARKERS["hermes"]
        out: list[CallEvent] = []
        while True:
            if not self._in_call:
                at = self._buf.find(start)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._buf, start)
                    text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                    out += self._content(text)
                    return out
                out += self._content(self._buf[:at])
                self._buf, self._in_call = self._buf[at + len(start):], True
            at = self._buf.find(end)
            if at < 0:
                if final:  # an unfinished block: not a call, the text it is
                    out += self._content(start + self._buf)
                    self._buf, self._in_call = "", False
                return out
            body, self._buf, self._in_call = self._buf[:at], self._buf[at + len(end):], False
            parsed = _json_call(body, "arguments")
            out += self._call(*parsed) if parsed else self._content(start + body + end)

    def _json_answer(self, final: bool) -> list[CallEvent]:
        """llama3_json and mistral: calls are the whole answer, so an answer that starts like one is
        held to its end; any other is content from the start."""
        if not self._decided:
            head = self._buf.lstrip()
            if not head:
                return []
            opener = ("[TOOL_CALLS]", "[") if self.family == "mistral" else ("<|python_tag|>", "{")
            self._whole = head.startswith(opener) or any(o.startswith(head) for o in opener)
            self._decided = True
        if not self._whole:
            text, self._buf = self._buf, ""
            return self._content(text)
        if not final:
            return []
        text, self._buf = self._buf.strip(), ""
        calls = _json_calls(self.family, text)
        if calls is None:
            return self._content(text)
        out: list[CallEvent] = []
        for name, arguments in calls:
            out += self._call(name, arguments)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _json_call(text: str, key: str) -> tuple[str, dict] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _call_of(value, key)


def _call_of(value, key: str) -> tuple[str, dict] | None:
    """(name, arguments) of a parsed call object, or None when it is not one."""
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
        if isinstance(arguments, dict):
            return value["name"], arguments
    return None


def _json_calls(family: str, text: str) -> list[tuple[str, dict]] | None:
    if family == "mistral":
        text = text.removeprefix("[TOOL_CALLS]").strip()
        try:
            items = json.loads(text)
        except ValueError:
            return None
        if not isinstance(items, list) or not items:
            return None
        calls = [_call_of(item, "arguments") for item in items]
        return None if any(c is None for c in calls) else calls
    text, calls, at = text.removeprefix("<|python_tag|>").strip(), [], 0
    decoder = json.JSONDecoder()
    while at < len(text):  # objects joined by ";" (a ";" inside an argument's string is the decoder's)
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = _call_of(value, "parameters")
        if call is None:
            return None
        calls.append(call)
        while at < len(text) and text[at] in "; \n\t":
            at += 1
    return calls or None
