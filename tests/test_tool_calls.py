"""Tool calls without a model: the parsers of each family (streamed in any cut, or whole), the
grammars that force a call, and the messages a template without tool support gets."""

from __future__ import annotations

import json

import pytest

from jaxlora.grammar import GrammarCompiler, checked_grammar
from jaxlora.tokenizer import load_tokenizer, render_chat
from jaxlora.tool_calls import FAMILIES, CallParser, call_grammar, detect_family, prepare_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}

ANSWERS = {  # family -> (what the model wrote, the content, the calls)
    "hermes": ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
               "Let me look.", [("get_weather", {"city": "Oslo", "days": 2}), ("now", {})]),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}; '
                    '{"name": "now", "parameters": {}}', "", [("get_weather", {"city": "Paris", "days": 1}), ("now", {})]),
    "mistral": ('[TOOL_CALLS][{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo", "days": 7}}]',
                "", [("now", {}), ("get_weather", {"city": "Oslo", "days": 7})]),
}


def _run(family: str, pieces: list[str]):
    parser, events = CallParser(family), []
    for p in pieces:
        events += parser.feed(p)
    events += parser.finish()
    content = "".join(e.content for e in events if e.index < 0)
    starts = {e.index: e.call for e in events if e.call is not None}
    args = {e.index: e.arguments for e in events if e.arguments is not None}
    assert sorted(starts) == sorted(args) == list(range(len(starts)))
    assert all(next(i for i, x in enumerate(events) if x.call is not None and x.index == k)
               < next(i for i, x in enumerate(events) if x.arguments is not None and x.index == k) for k in starts)
    return content, [(starts[i].name, json.loads(args[i])) for i in sorted(starts)]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_parses_the_same_calls_whole_and_streamed_in_any_cut(family):
    text, content, calls = ANSWERS[family]
    assert _run(family, [text]) == (content, calls)
    for size in (1, 2, 5, 13):
        assert _run(family, [text[i:i + size] for i in range(0, len(text), size)]) == (content, calls)


def test_text_that_is_not_a_call_stays_content():
    assert _run("hermes", ["plain <tool_call>{not json}</tool_call> end <tool_c"]) == (
        "plain <tool_call>{not json}</tool_call> end <tool_c", [])
    assert _run("hermes", ["cut <tool_call>\n{\"name\": \"now\""]) == ("cut <tool_call>\n{\"name\": \"now\"", [])
    assert _run("llama3_json", ['{"answer": 42}']) == ('{"answer": 42}', [])
    assert _run("mistral", ["Hello [there]"]) == ("Hello [there]", [])


def test_the_family_comes_from_the_chat_template():
    assert detect_family("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_family("{% if role == 'ipython' %}<|python_tag|>{% endif %}") == "llama3_json"
    assert detect_family("<tool_call>{{ tool }}</tool_call>") == "hermes"
    assert detect_family(None) == "hermes"


@pytest.fixture(scope="module")
def compiler(demo_model_dir):
    tokenizer = load_tokenizer(demo_model_dir)
    c = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    yield tokenizer, c
    c.close()


def _accepts(compiler, grammar: str, text: str) -> bool:
    tokenizer, c = compiler
    m = c.matcher(grammar)
    ok = m.ll.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ok and m.ll.is_accepting()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_forced_grammar_takes_calls_to_the_tools_and_nothing_else(compiler, family):
    text, _, _ = ANSWERS[family]
    prefix = {"hermes": 'Let me look. ', "llama3_json": "<|python_tag|>", "mistral": ""}[family]
    calls_only = text.removeprefix(prefix)
    many = checked_grammar(call_grammar(family, [WEATHER, NOW], parallel=True), "tools")
    one = checked_grammar(call_grammar(family, [WEATHER, NOW], parallel=False), "tools")
    assert _accepts(compiler, many, calls_only)
    assert not _accepts(compiler, one, calls_only)  # two calls where one is allowed
    first = {"hermes": calls_only.split("\n<tool_call>")[0],
             "llama3_json": calls_only.split("; ")[0],
             "mistral": calls_only.split(", {")[0] + "]"}[family]
    assert _accepts(compiler, one, first)
    assert not _accepts(compiler, many, first.replace("Oslo", "Rome").replace("Paris", "Rome").replace('"now"', '"later"'))
    assert not _accepts(compiler, many, "I would rather not.")


def test_a_template_without_tools_gets_them_in_the_system_message_and_calls_in_hermes_form(demo_model_dir):
    tokenizer = load_tokenizer(demo_model_dir)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                    "arguments": '{"city": "Oslo", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = render_chat(tokenizer, history, [WEATHER])
    assert "Be brief." in text and '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    native = prepare_messages(history, [WEATHER], native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "days": 1}  # a dict for the template
    assert native[3] == history[3]


FUNCTION_CALLING_ROW = {
    "tools": [WEATHER],
    "messages": [{"role": "user", "content": "Weather in Oslo tomorrow?"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                 {"role": "assistant", "content": "Rain in Oslo."}]}


def test_function_calling_rows_train_the_calls_serving_parses(demo_model_dir, tmp_path):
    """OpenAI's function-calling fine-tuning rows: the prompt side is what serving renders for the
    same tools and history, the trained side is the calls in the family's form (which the parser
    reads back as the same call) and the final answer."""
    from jaxlora.errors import DataError
    from training.data import check_upload, load_dataset

    tokenizer = load_tokenizer(demo_model_dir)
    path = tmp_path / "calls.jsonl"
    path.write_text(json.dumps(FUNCTION_CALLING_ROW) + "\n")
    assert check_upload(path.read_bytes()) == {"chat": 1}
    (example,) = load_dataset(path, tokenizer, "sft", 2048).examples
    trained = [t for t, m in zip(example.ids, example.loss_mask) if m]
    messages = FUNCTION_CALLING_ROW["messages"]
    served_prompt = tokenizer(render_chat(tokenizer, messages[:1], [WEATHER]), add_special_tokens=False)["input_ids"]
    assert list(example.ids[:len(served_prompt)]) == served_prompt and not any(example.loss_mask[:len(served_prompt)])
    eos = tokenizer.eos_token_id
    first_answer = tokenizer.decode(trained[:trained.index(eos)])
    assert _run(detect_family(tokenizer.chat_template), [first_answer]) == ("", [("get_weather", {"city": "Oslo", "days": 2})])
    assert tokenizer.decode(trained[trained.index(eos) + 1:-1]) == "Rain in Oslo."
    bad = {**FUNCTION_CALLING_ROW, "messages": [messages[0], {"role": "assistant", "content": None,
                                                               "tool_calls": [{"function": {"arguments": "{}"}}]}]}
    with pytest.raises(DataError, match=r"tool_calls\[0\] needs a 'function' with a string 'name'"):
        check_upload((json.dumps(bad) + "\n").encode())
