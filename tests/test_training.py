"""Training: parity of loss and gradients with PEFT, DPO against its formula, learning the demo
FAQ for real, bitwise resume, the published adapter in PEFT, and data errors by line."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlora.adapter_format import read_adapter
from jaxlora.backend import LocalJaxLoRABackend
from jaxlora.hf_checkpoint import load_params, model_fingerprint
from jaxlora.engine import EngineConfig
from jaxlora.lora import LoraModule, LoraStack, lora_scale
from jaxlora.model import PROJECTIONS, forward
from jaxlora.tokenizer import load_tokenizer
from tests.hf_models import LOGIT_TOL, load_reference
from jaxlora.errors import DataError
from training.data import load_dataset
from training.losses import dpo_loss, sequence_logprobs
from training.spec import TrainSpec
from training.trainer import _train, loss_fn, train

# The demo FAQ's spec as it was for the tiny model (configs/train/demo_faq.yaml is for the real one).
TOY_FAQ = dict(user_id="local", adapter_id="demo-faq", data="tests/data/toy_faq.jsonl", objective="sft",
               lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": list(PROJECTIONS)}, learning_rate=0.003,
               warmup_steps=10, steps=120, batch_size=8, max_length=64, checkpoint_every=50, log_every=25, seed=0)


def _spec(**kw) -> TrainSpec:
    base = dict(user_id="u", adapter_id="a", data="unused.jsonl", steps=1, lora={"r": 4, "alpha": 8})
    return TrainSpec(**(base | kw))


def test_loss_and_gradients_equal_peft(tiny_checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    d = tiny_checkpoints["llama_gqa"]
    params, cfg = load_params(d)
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(load_reference(d), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                              init_lora_weights=False, lora_dropout=0.0))
    peft_model.save_pretrained(tmp_path / "init")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(3, 12))
    labels = ids.copy()
    labels[:, :5] = -100  # the "prompt" is not trained
    labels[2, 9:] = -100  # a shorter row
    out = peft_model(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
    out.loss.backward()

    adapter = read_adapter(tmp_path / "init", cfg, max_rank=4)
    trainable = tuple({m: LoraModule(a=jnp.asarray(adapter.weights[(i, m)][0])[None], b=jnp.asarray(adapter.weights[(i, m)][1])[None])
                       for m in targets} for i in range(cfg.num_layers))
    batch = {"tokens": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
             "mask": (labels[:, 1:] != -100).astype(np.float32)}
    spec = _spec(lora={"r": 4, "alpha": 8, "target_modules": targets})
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, params, batch, jax.random.PRNGKey(0), cfg, spec)
    # JAX vs PyTorch, summed in other orders: a few ulps of a loss ~6 and of gradients up to ~1 (measured
    # 4.8e-7 and 9.5e-7), far inside 1e-4 on any host.
    assert abs(float(loss) - out.loss.item()) <= 1e-4
    named = dict(peft_model.named_parameters())
    for i in range(cfg.num_layers):
        for m in targets:
            part = "mlp" if m == "down_proj" else "self_attn"
            prefix = f"base_model.model.model.layers.{i}.{part}.{m}"
            ga = named[f"{prefix}.lora_A.default.weight"].grad.numpy().T
            gb = named[f"{prefix}.lora_B.default.weight"].grad.numpy().T
            assert np.abs(np.asarray(grads[i][m].a[0]) - ga).max() <= 1e-4
            assert np.abs(np.asarray(grads[i][m].b[0]) - gb).max() <= 1e-4
            assert np.abs(ga).max() > 1e-4  # the comparison is not between zeros


def test_dpo_loss_equals_its_formula(tiny_checkpoints):
    params, cfg = load_params(tiny_checkpoints["llama_gqa"])
    rng = np.random.default_rng(1)
    trainable = tuple({"q_proj": LoraModule(a=jnp.asarray(rng.normal(0, 0.3, (1, 64, 4)), jnp.float32),
                                            b=jnp.asarray(rng.normal(0, 0.3, (1, 4, 64)), jnp.float32))}
                      for _ in range(cfg.num_layers))
    ids = rng.integers(3, cfg.vocab_size, size=(4, 9))  # rows 0-1 chosen, 2-3 rejected
    mask = np.zeros((4, 8), np.float32)
    mask[:, 3:] = 1
    batch = {"tokens": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32), "mask": mask}
    spec = _spec(objective="dpo", dpo_beta=0.3, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    loss, _ = loss_fn(trainable, params, batch, jax.random.PRNGKey(0), cfg, spec)

    stack = LoraStack(layers=trainable, scale=jnp.full((1,), lora_scale(8, 4), jnp.float32))
    pos = np.broadcast_to(np.arange(8), (4, 8))
    pol, _ = forward(params, batch["tokens"], pos, cfg, lora=stack, slots_B=np.zeros(4, np.int32))
    ref, _ = forward(params, batch["tokens"], pos, cfg)

    def seq_logp(logits):
        lp = np.asarray(jax.nn.log_softmax(logits, -1))
        return np.array([sum(lp[b, t, batch["targets"][b, t]] for t in range(8) if mask[b, t]) for b in range(4)])

    p, r = seq_logp(pol), seq_logp(ref)
    margins = (p[:2] - r[:2]) - (p[2:] - r[2:])
    expected = np.mean(np.log1p(np.exp(-0.3 * margins)))  # -log sigmoid(x) = log(1 + e^-x)
    # The same forward at the same shapes; only the last float32 sums (8 log-probs, 2 pairs) differ in
    # order, a few ulps of a loss ~0.2 (measured <= 1.5e-8).
    assert abs(float(loss) - expected) <= 1e-5
    assert abs(float(dpo_loss(sequence_logprobs(pol, batch["targets"], mask), sequence_logprobs(ref, batch["targets"], mask), 0.3)[0]) - expected) <= 1e-5


def test_the_shipped_demo_spec_fits_the_default_model(smollm2_gguf):
    """configs/train/demo_faq.yaml (what `./dev train` runs on the default model): it parses, every row
    renders under the model's chat template within max_length, and only the answers are trained."""
    spec = TrainSpec.from_yaml("configs/train/demo_faq.yaml")
    assert spec.model_dir is None  # the default model, as `./dev serve` serves it
    data = load_dataset(spec.data, load_tokenizer(smollm2_gguf), spec.objective, spec.max_length)
    assert len(data.examples) == 24
    for ex in data.examples:
        assert 0 < sum(ex.loss_mask) < len(ex.ids) - 20  # the question and the system prompt are context


@pytest.fixture(scope="module")
def faq_run(demo_model_dir, tmp_path_factory):
    fs = tmp_path_factory.mktemp("faq-fs")
    spec = TrainSpec(**TOY_FAQ, fs_root=str(fs), model_dir=str(demo_model_dir))
    result = train(spec)
    return spec, result


def test_demo_faq_is_learned_and_served(faq_run, demo_model_dir):
    spec, result = faq_run
    manifest = json.loads(open(f"{result.path}/manifest.json").read())
    curve = manifest["training"]["loss_curve"]
    assert curve[-1] < curve[0] / 10
    assert manifest["training"]["data_sha256"] == hashlib.sha256(open(spec.data, "rb").read()).hexdigest()
    assert manifest["base_model"] == {"name": demo_model_dir.name, "fingerprint": model_fingerprint(demo_model_dir)}
    assert open(f"{result.path}/loss_curve.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in open(spec.data)]
    backend = LocalJaxLoRABackend(demo_model_dir, spec.fs_root, EngineConfig(max_batch_size=8, max_seq_len=64,
                                                                            prefill_chunk=16))
    try:
        def answered(adapter):
            return sum(backend.generate(prompt=r["prompt"], adapter=adapter, user="local", max_tokens=12,
                                        temperature=0).text == r["completion"] for r in rows)

        assert answered("demo-faq") >= 30
        assert answered(None) == 0
    finally:
        backend.close()


def test_published_adapter_loads_in_peft_with_serving_logits(faq_run, demo_model_dir):
    from peft import PeftModel

    _, result = faq_run
    params, cfg = load_params(demo_model_dir)
    adapter = read_adapter(result.path, cfg, max_rank=16)
    stack = LoraStack(layers=tuple({m: LoraModule(a=jnp.asarray(adapter.weights[(i, m)][0])[None],
                                                  b=jnp.asarray(adapter.weights[(i, m)][1])[None])
                                    for m in adapter.target_modules} for i in range(cfg.num_layers)),
                      scale=jnp.full((1,), adapter.scale, jnp.float32))
    ids = load_tokenizer(demo_model_dir)("Q: What are slots?\nA:")["input_ids"]
    ours, _ = forward(params, np.array([ids]), np.arange(len(ids))[None], cfg, lora=stack, slots_B=np.zeros(1, np.int32))
    peft_model = PeftModel.from_pretrained(load_reference(demo_model_dir), result.path).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.asarray(ours[0]) - ref).max() <= LOGIT_TOL  # measured <= 5.8e-6 at logits ~15


def test_killed_run_resumes_to_the_same_weights(demo_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n" for i in range(10)))
    common = dict(user_id="u", adapter_id="r", data=str(data), model_dir=str(demo_model_dir), steps=9, batch_size=4,
                  grad_accum_steps=2, checkpoint_every=3, max_length=32, learning_rate=0.01, log_every=100,
                  lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "up_proj"]},
                  weight_decay=0.01, seed=3)
    straight = train(TrainSpec(**common, fs_root=str(tmp_path / "a")))
    interrupted = TrainSpec(**common, fs_root=str(tmp_path / "b"))
    assert _train(interrupted, stop_after_steps=4) is None  # "killed" after step 4 (checkpoint at 3)
    with pytest.raises(ValueError, match="made with seed 3, this spec has seed 4"):  # would replay other batches
        train(interrupted.model_copy(update={"seed": 4}))
    resumed = train(interrupted)
    assert resumed.resumed_from_step == 3 and straight.resumed_from_step == 0
    a = read_adapter(straight.path, load_params(demo_model_dir)[1], 4)
    b = read_adapter(resumed.path, load_params(demo_model_dir)[1], 4)
    assert a.weights and a.weights.keys() == b.weights.keys()
    for k in a.weights:  # bitwise: the same steps at the same shapes, from exactly restored state
        np.testing.assert_array_equal(a.weights[k][0], b.weights[k][0])
        np.testing.assert_array_equal(a.weights[k][1], b.weights[k][1])
    assert json.loads(open(f"{resumed.path}/manifest.json").read())["training"]["loss_curve"] == \
        json.loads(open(f"{straight.path}/manifest.json").read())["training"]["loss_curve"]


@pytest.mark.parametrize("content,words", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"d.jsonl:2: field 'completion' must be a string"),
    ('{"prompt": "a", "completion": 5}\n', r"d.jsonl:1: field 'completion' must be a string"),
    ('\n\n', r"holds no rows"),
    ('[1, 2]\n', r"d.jsonl:1: each line must be a JSON object"),
    ('{"text": "a"}\n', r"d.jsonl:1: expected 'prompt'\+'completion'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"d.jsonl:1: the conversation has no assistant turn"),
    ('{"prompt": "a", "completion": "' + "word " * 200 + '"}\n', r"d.jsonl:1: \d+ tokens, more than max_length=32"),
])
def test_bad_data_is_refused_with_its_line(demo_model_dir, tmp_path, content, words):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=words):
        load_dataset(tmp_path / "d.jsonl", load_tokenizer(demo_model_dir), "sft", 32)


def test_dpo_needs_preference_rows_and_missing_files_fail_early(demo_model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: DPO needs preference rows \('prompt', 'chosen' and 'rejected'"):
        load_dataset(tmp_path / "d.jsonl", load_tokenizer(demo_model_dir), "dpo", 32)
    with pytest.raises(DataError, match="does not exist"):
        train(_spec(data=str(tmp_path / "missing.jsonl"), model_dir=str(demo_model_dir),
                                      fs_root=str(tmp_path / "fs")))
    assert not (tmp_path / "fs").exists()  # nothing was written


def test_chat_rows_train_only_assistant_turns(demo_model_dir, tmp_path):
    tok = load_tokenizer(demo_model_dir)
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}) + "\n")
    ex = load_dataset(tmp_path / "d.jsonl", tok, "sft", 64).examples[0]
    trained = tok.decode([t for t, m in zip(ex.ids, ex.loss_mask) if m], skip_special_tokens=False)
    assert trained == "hello<|end|>ciao<|end|>"


def test_dpo_training_prefers_chosen(demo_model_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"}) + "\n" for i in range(8)))
    spec = TrainSpec(user_id="u", adapter_id="dpo", data=str(data), model_dir=str(demo_model_dir), objective="dpo",
                     steps=15, batch_size=4, max_length=32, learning_rate=0.01, fs_root=str(tmp_path / "fs"),
                     lora={"r": 4, "alpha": 8}, log_every=100)
    result = train(spec)
    curve = json.loads(open(f"{result.path}/manifest.json").read())["training"]["loss_curve"]
    assert abs(curve[0] - np.log(2)) < 0.05 and curve[-1] < curve[0] / 2  # starts at log 2 (adapter = reference)
