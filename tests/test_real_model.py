"""The real default model (SmolLM2-135M-Instruct, its Q4_1 GGUF) served by the app on real Ray Serve
and asked over HTTP with the official `openai` client, against transformers' own GGUF loading and
`generate` (+ PEFT for an adapter) on the same weights: the same greedy chat answers."""

from __future__ import annotations

import concurrent.futures
import socket
from pathlib import Path

import openai
import pytest
import torch
from pydantic import BaseModel, Field

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from jaxlora.adapter_format import write_peft  # noqa: E402
from jaxlora.adapter_store import AdapterStore  # noqa: E402
from jaxlora.config import ModelConfig  # noqa: E402
from jaxlora.hf_checkpoint import model_fingerprint, model_name  # noqa: E402
from jaxlora.tiny_model import random_adapter  # noqa: E402
from serve_app.app import build_app  # noqa: E402

QUESTIONS = [  # each with a margin >= 8e-3 at every greedy step, base and adapter (MIN_MARGIN)
    "What is the capital of France?",
    "What is the largest planet in our solar system?",
    "Who wrote Romeo and Juliet?",
    "Name three primary colors.",
    "What is photosynthesis?",
    "How many days are there in a week?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "What does a compiler do?",
    "What is the chemical symbol for gold?",
    "Who painted the Mona Lisa?",
    "Which ocean is the largest?",
]
MAX_TOKENS = 16
# Greedy answers are promised equal only where no step is a near tie: our float32 logits and
# transformers' differ by up to 1e-3 on this model (tests/test_gguf.py REAL_LOGIT_TOL), so every
# step's margin between the first and second token, in transformers' logits, must exceed twice that.
MIN_MARGIN = 2e-3


@pytest.fixture(scope="module")
def app(ray_local, smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    store = AdapterStore(root / "fs")
    cfg = ModelConfig.from_dir(smollm2_gguf)
    base = {"name": model_name(smollm2_gguf), "fingerprint": model_fingerprint(smollm2_gguf)}
    adapter = random_adapter(cfg, r=8, alpha=16, seed=3, std=0.03)
    published = store.publish("local", "style", lambda d: write_peft(adapter, d, base_model=base["name"]), base_model=base)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Room for what the agent libraries send (their instructions, tools and schemas); chunks of 128 so
    # the questions are one prefill call each, as they were with a 128-token context.
    engine = {"max_batch_size": 4, "max_seq_len": 1024, "prefill_chunk": 128, "decode_steps": 4, "num_adapter_slots": 2,
              "max_lora_rank": 8}
    serve.run(build_app({"model_dir": str(smollm2_gguf), "fs_root": str(root / "fs"), "model_num_cpus": 0,
                         "engine": engine}), name="real", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    client.port = port
    yield client, base["name"], published.path
    serve.shutdown()


@pytest.fixture(scope="module")
def expected(app, smollm2_reference):
    """transformers' own GGUF loading of the same file and its tokenizer, + PEFT for the adapter:
    question -> greedy answer, for the base model and for the adapter."""
    from peft import PeftModel

    model, tokenizer = smollm2_reference
    model = PeftModel.from_pretrained(model, app[2]).eval()
    try:
        with model.disable_adapter():
            base = greedy(model, tokenizer, QUESTIONS)
        return {False: base, True: greedy(model, tokenizer, QUESTIONS)}
    finally:
        model.unload()  # the session's reference model, as it was


def greedy(model, tokenizer, questions: list[str]) -> dict[str, tuple[str, float]]:
    """transformers' greedy chat answers (up to MAX_TOKENS, to the end-of-turn token), all questions in
    one left-padded batch, and for each the smallest margin between its first and second logit over
    its own steps (to its end of turn)."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for q in questions]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_TOKENS,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    answers = {}
    for i, question in enumerate(questions):
        tokens = out.sequences[i, width:].tolist()
        steps = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
        top2 = [torch.topk(out.logits[k][i], 2).values for k in range(steps)]
        answers[question] = (tokenizer.decode(tokens[:steps], skip_special_tokens=True),
                             min(float(v[0] - v[1]) for v in top2))
    return answers


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_greedy_chat_answers_equal_transformers_on_the_real_model(app, expected, adapter):
    client, base, _ = app

    def ask(question: str) -> str:
        return client.chat.completions.create(model="style" if adapter else base, max_tokens=MAX_TOKENS, temperature=0,
                                              messages=[{"role": "user", "content": question}]).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # batched together, as a server sees them
        replies = dict(zip(QUESTIONS, pool.map(ask, QUESTIONS)))
    for question in QUESTIONS:
        answer, margin = expected[adapter][question]
        assert margin > MIN_MARGIN, f"{question!r}: a near tie ({margin:.1e}) makes equality no promise; pick another"
        assert replies[question] == answer, question
    if adapter:  # the adapter really is applied, on both sides
        assert sum(expected[True][q][0] != expected[False][q][0] for q in QUESTIONS) >= 3
    else:
        assert "Paris" in expected[False][QUESTIONS[0]][0]


# -- the libraries applications use, unchanged, against the app ------------------------------------

class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


def get_weather(city: str) -> str:
    """The weather today in a city."""
    return f"It is sunny and 21 degrees in {city}."


def _base_url(app) -> str:
    return f"http://127.0.0.1:{app[0].port}/v1"


def test_openai_agents_calls_the_required_tool_and_runs_to_a_final_output(app):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    model = agents.OpenAIChatCompletionsModel(
        model=app[1], openai_client=openai.AsyncOpenAI(base_url=_base_url(app), api_key="none", max_retries=0))
    agent = agents.Agent(name="weather", instructions="Answer in one short sentence.",
                         tools=[agents.function_tool(get_weather)], model=model,
                         model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=64))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    calls = [i for i in result.new_items if isinstance(i, agents.ToolCallItem)]
    outputs = [i for i in result.new_items if isinstance(i, agents.ToolCallOutputItem)]
    assert calls and outputs and calls[0].raw_item.name == "get_weather"
    assert isinstance(result.final_output, str) and result.final_output.strip()


def test_pydantic_ai_returns_its_output_type_with_a_tool_at_hand(app):
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(app[1], provider=OpenAIProvider(base_url=_base_url(app), api_key="none"))
    agent = pydantic_ai.Agent(model, output_type=City, tools=[get_weather],
                              model_settings={"temperature": 0, "max_tokens": 96})
    result = agent.run_sync("Which city is the capital of France, and in which country is it?",
                            usage_limits=pydantic_ai.UsageLimits(request_limit=6))
    assert isinstance(result.output, City) and result.output.name


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_gets_a_valid_object_in_tools_and_json_schema_modes(app, mode):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(openai.OpenAI(base_url=_base_url(app), api_key="none", max_retries=0),
                                    mode=getattr(instructor.Mode, mode))
    city = client.chat.completions.create(model=app[1], response_model=City, max_retries=0, temperature=0, max_tokens=96,
                                          messages=[{"role": "user", "content": "Name the capital of France as JSON."}])
    assert isinstance(city, City) and city.name


def test_langchain_structured_output_and_bound_tools(app):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=app[1], base_url=_base_url(app), api_key="none", temperature=0,
                                      max_tokens=96, max_retries=0)
    city = llm.with_structured_output(City, method="json_schema", strict=True).invoke(
        "Name the capital of France and its country.")
    assert isinstance(city, City) and city.name
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Oslo?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
