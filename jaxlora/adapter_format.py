"""Reading and writing LoRA adapters on disk: PEFT's format, and the older `params.json` layout.

PEFT: `adapter_config.json` + `adapter_model.safetensors` with tensors named
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`, A [r, in] and
B [out, r]. What we write, `PeftModel.from_pretrained` loads, and the reverse.

Older layout: `params.json`, one JSON object whose keys are `<module path>.A` / `<module path>.B`
(the module path as in PEFT, with or without the `base_model.model.` prefix) holding nested lists
with A [in, r] and B [r, out] (`y = x @ A @ B`), plus optional `lora_alpha` (or `alpha`) and `r`;
without them the scale is 1.

Pickled weights (`.bin`, `.pt`) are never loaded. Every way an adapter can fail to fit the model
(rank, shapes, modules, unsupported PEFT features, damaged files) raises `AdapterFormatError` with a
message that says what to change. This module knows nothing about tenants, versions or devices.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxlora.adapter_store import MANIFEST, AdapterStore, ResolvedAdapter, sha256_of
from jaxlora.config import ModelConfig
from jaxlora.errors import AdapterFormatError
from jaxlora.lora import lora_scale
from jaxlora.model import PROJECTIONS

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LEGACY_PARAMS = "params.json"
CHAT_TEMPLATE = "chat_template.jinja"  # an adapter's own chat template (or "chat_template" in tokenizer_config.json)
MAX_CHAT_TEMPLATE_BYTES = 256 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

_MODULE_PATH = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+)\.(\w+)$")  # layer, block, module


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One adapter in host memory, in this project's orientation (`y = x @ W + scale * x @ a @ b`)."""

    r: int
    alpha: float
    use_rslora: bool
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]  # (layer, module) -> (a [in, r], b [r, out])
    base_model: str | None = None

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.use_rslora)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for _, m in self.weights}))


def _module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{PROJECTIONS[module].hf_path}"


def _parse_module_path(path: str, source: str) -> tuple[int, str]:
    m = _MODULE_PATH.match(path)
    if not m or m.group(3) not in PROJECTIONS or PROJECTIONS[m.group(3)].block != m.group(2):
        raise AdapterFormatError(
            f"{source}: LoRA weights for {path!r}, which this model lacks; LoRA is supported on "
            f"model.layers.N.{{self_attn,mlp}}.{{{','.join(PROJECTIONS)}}}"
        )
    return int(m.group(1)), m.group(3)


def _refuse_pickle(path: Path) -> None:
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterFormatError(
            f"adapter {path} has only pickled weights ({', '.join(pickled)}), which are never loaded; convert them "
            f"to safetensors, e.g. PeftModel.save_pretrained(dir, safe_serialization=True)"
        )


def _check_peft_config(c: dict, path: Path) -> None:
    def refuse(what: str, fix: str) -> None:
        raise AdapterFormatError(f"adapter {path}: {what} is not supported; {fix}")

    if c.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type {c.get('peft_type')!r}", "only LORA adapters can be served")
    if c.get("use_dora"):
        refuse("DoRA (use_dora=true)", "train a plain LoRA adapter or merge the DoRA adapter into a base model")
    if c.get("modules_to_save"):
        refuse(f"modules_to_save={c['modules_to_save']}", "train without fully fine-tuned modules")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        refuse("training biases (bias / lora_bias)", "train with bias='none'")
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        refuse("rank_pattern / alpha_pattern", "train with one r and lora_alpha for every module")
    if c.get("fan_in_fan_out"):
        refuse("fan_in_fan_out=true", "these models use nn.Linear, so it must be false")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if c.get(key):
            refuse(key, f"remove {key} from the adapter")
    targets = c.get("target_modules")
    if isinstance(targets, list):  # a string is a regex; the tensor names are checked either way
        lacking = [t for t in targets if t.rsplit(".", 1)[-1] not in PROJECTIONS]
        if lacking:
            raise AdapterFormatError(
                f"adapter {path}: target_modules {lacking} are not in this model; LoRA is supported on "
                f"{', '.join(PROJECTIONS)}"
            )
    for key in ("r", "lora_alpha"):
        if not isinstance(c.get(key), (int, float)) or c[key] <= 0:
            raise AdapterFormatError(f"adapter {path}: {PEFT_CONFIG} needs a positive number {key!r}")


def _json_object(path: Path, name: str) -> dict:
    """The JSON object in `path / name`, or an AdapterFormatError that names the file."""
    try:
        d = json.loads((path / name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"adapter {path}: {name} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise AdapterFormatError(f"adapter {path}: {name} must hold a JSON object")
    return d


def read_chat_template(path: str | Path) -> str | None:
    """The adapter folder's own chat template (`chat_template.jinja`, else `chat_template` in
    `tokenizer_config.json`, a string or transformers' list of named templates, whose "default" is
    taken), or None: requests to the adapter are then rendered with it instead of the base model's."""
    path = Path(path)
    if (path / CHAT_TEMPLATE).is_file():
        data = (path / CHAT_TEMPLATE).read_bytes()
        if len(data) > MAX_CHAT_TEMPLATE_BYTES:
            raise AdapterFormatError(f"adapter {path}: {CHAT_TEMPLATE} is over {MAX_CHAT_TEMPLATE_BYTES} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AdapterFormatError(f"adapter {path}: {CHAT_TEMPLATE} is not UTF-8 ({e})") from e
    if not (path / "tokenizer_config.json").is_file():
        return None
    template = _json_object(path, "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise AdapterFormatError(f"adapter {path}: tokenizer_config.json's chat_template must be a string")
    return template


def _read_peft(path: Path) -> LoraAdapter:
    c = _json_object(path, PEFT_CONFIG)
    _check_peft_config(c, path)
    if not (path / PEFT_WEIGHTS).is_file():
        _refuse_pickle(path)
        raise AdapterFormatError(f"adapter {path}: missing file {PEFT_WEIGHTS}")
    try:
        tensors = load_file(path / PEFT_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"adapter {path}: cannot read {PEFT_WEIGHTS}: {e} (truncated or corrupt?)") from e
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[\w-]+)?\.weight$", name)
        if not m:
            raise AdapterFormatError(f"adapter {path}: unexpected tensor {name!r} (not a lora_A / lora_B weight)")
        key = _parse_module_path(m.group(1), f"adapter {path}")
        halves.setdefault(key, {})[m.group(2)] = t
    weights = {}
    for (layer, module), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"adapter {path}: {_module_path(layer, module)} has lora_A or lora_B but not both")
        a = ab["A"].astype(np.float32).T  # [r, in] -> [in, r]
        b = ab["B"].astype(np.float32).T  # [out, r] -> [r, out]
        weights[(layer, module)] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return LoraAdapter(
        r=int(c["r"]),
        alpha=float(c["lora_alpha"]),
        use_rslora=bool(c.get("use_rslora", False)),
        weights=weights,
        base_model=c.get("base_model_name_or_path"),
    )


def _read_legacy(path: Path) -> LoraAdapter:
    d = _json_object(path, LEGACY_PARAMS)
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, value in d.items():
        if name in ("r", "alpha", "lora_alpha"):
            continue
        if not (name.endswith(".A") or name.endswith(".B")):
            raise AdapterFormatError(f"adapter {path}: unexpected key {name!r} in {LEGACY_PARAMS} (want '<module>.A' / '<module>.B')")
        key = _parse_module_path(name[:-2], f"adapter {path}")
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise AdapterFormatError(f"adapter {path}: {name} is not a numeric matrix ({e})") from e
        if arr.ndim != 2:
            raise AdapterFormatError(f"adapter {path}: {name} must be a 2-D matrix, got shape {arr.shape}")
        halves.setdefault(key, {})[name[-1]] = arr
    weights = {}
    for (layer, module), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"adapter {path}: {_module_path(layer, module)} has .A or .B but not both")
        weights[(layer, module)] = (ab["A"], ab["B"])
    if not weights:
        raise AdapterFormatError(f"adapter {path}: {LEGACY_PARAMS} holds no LoRA matrices")
    r = int(d.get("r") or next(iter(weights.values()))[0].shape[1])
    alpha = float(d.get("lora_alpha", d.get("alpha", r)))
    return LoraAdapter(r=r, alpha=alpha, use_rslora=False, weights=weights)


def read_adapter(path: str | Path, cfg: ModelConfig, max_rank: int) -> LoraAdapter:
    """Reads the adapter in directory `path` and checks that it fits `cfg` with at most `max_rank`."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"adapter directory {path} does not exist")
    if (path / PEFT_CONFIG).is_file():
        adapter = _read_peft(path)
    elif (path / LEGACY_PARAMS).is_file():
        adapter = _read_legacy(path)
    else:
        _refuse_pickle(path)
        raise AdapterFormatError(f"adapter {path}: no {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT) or {LEGACY_PARAMS} found")
    validate(adapter, cfg, max_rank, source=str(path))
    return adapter


def read_published(path: Path, cfg: ModelConfig, max_rank: int, base_fingerprint: str | None = None) -> LoraAdapter:
    """Reads a version published by the adapter store, checking its manifest first: the weights
    must hash to what the manifest recorded (a damaged copy is refused) and, when both sides know
    it, the base model the adapter was trained on must be the one being served."""
    manifest = _json_object(path, MANIFEST) if (path / MANIFEST).is_file() else {}
    base = manifest.get("base_model") or {}
    if base_fingerprint and base.get("fingerprint") and base["fingerprint"] != base_fingerprint:
        raise AdapterFormatError(
            f"adapter {path} was trained for base model {base.get('name', '?')} (fingerprint {base['fingerprint']}); "
            f"this server runs a different one (fingerprint {base_fingerprint}): retrain it on this base model"
        )
    for name, digest in (manifest.get("weights_sha256") or {}).items():
        f = path / name
        if not f.is_file() or sha256_of(f) != digest:
            raise AdapterFormatError(f"adapter {path}: {name} does not match the sha256 in manifest.json (damaged copy?)")
    return read_adapter(path, cfg, max_rank)


def validate(adapter: LoraAdapter, cfg: ModelConfig, max_rank: int, source: str = "adapter") -> None:
    if adapter.r > max_rank:
        raise AdapterFormatError(
            f"{source}: rank r={adapter.r} is above this server's max_lora_rank={max_rank}; "
            f"retrain with r <= {max_rank} or raise max_lora_rank"
        )
    if not adapter.weights:
        raise AdapterFormatError(f"{source}: the adapter holds no LoRA weights")
    for (layer, module), (a, b) in adapter.weights.items():
        where = _module_path(layer, module)
        if layer >= cfg.num_layers:
            raise AdapterFormatError(
                f"{source}: {where} targets layer {layer}, but this model has {cfg.num_layers} layers; "
                "was the adapter trained for another base model?"
            )
        d_in, d_out = PROJECTIONS[module].shape(cfg)
        if a.shape != (d_in, adapter.r) or b.shape != (adapter.r, d_out):
            raise AdapterFormatError(
                f"{source}: {where} has A {a.shape[::-1]} / B {b.shape[::-1]} (PEFT orientation) but this model with "
                f"r={adapter.r} needs A {(adapter.r, d_in)} / B {(d_out, adapter.r)}; "
                "the adapter was trained for another base model"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterFormatError(f"{source}: {where} holds NaN or infinite values")


def write_peft(adapter: LoraAdapter, out: str | Path, base_model: str | None = None) -> None:
    """Writes `adapter` in PEFT's format into directory `out` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        prefix = f"base_model.model.{_module_path(layer, module)}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(np.float32))
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(np.float32))
    save_file(tensors, out / PEFT_WEIGHTS, metadata={"format": "pt"})
    layers = sorted({layer for layer, _ in adapter.weights})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": list(adapter.target_modules),
        "layers_to_transform": layers if len(layers) < 1 + max(layers) else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model or adapter.base_model,
    }
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def publish_upload(store: AdapterStore, user_id: str, adapter_id: str, files: dict[str, bytes], cfg: ModelConfig, max_rank: int,
                   base_model: dict) -> ResolvedAdapter:
    """Publishes a tenant's PEFT adapter (`adapter_config.json` and `adapter_model.safetensors` as
    bytes, and optionally its own `chat_template.jinja`) as the next version of `adapter_id`, once it reads as an adapter for `cfg` (rank, targets,
    shapes, finite values: `read_adapter`'s checks and messages). Nothing is published otherwise."""
    missing = [n for n in (PEFT_CONFIG, PEFT_WEIGHTS) if n not in files]
    if missing:
        raise AdapterFormatError(f"the upload lacks {missing}: send {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / adapter_id
        folder.mkdir()
        names = [n for n in (PEFT_CONFIG, PEFT_WEIGHTS, CHAT_TEMPLATE) if n in files]
        for name in names:
            (folder / name).write_bytes(files[name])
        read_adapter(folder, cfg, max_rank)
        read_chat_template(folder)

        def write(dest: Path) -> None:
            for name in names:
                shutil.copyfile(folder / name, dest / name)

        return store.publish(user_id, adapter_id, write, base_model=base_model, extra_manifest={"uploaded": True})
