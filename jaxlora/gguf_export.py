"""Writes a standard Hugging Face model folder from a GGUF, for users (and tools) that want one.

    python -m jaxlora.gguf_export MODEL.gguf OUT_DIR

OUT_DIR gets `config.json`, `model.safetensors` (float32, the GGUF's tensors dequantized, in
Hugging Face's names and layout) and the tokenizer (`tokenizer.json`, `tokenizer_config.json`
with the chat template): what `transformers`, PEFT and this project load as any Hugging Face
checkpoint. The folder is written beside OUT_DIR and renamed into place when complete, so a
reader never sees half of it; an existing OUT_DIR is refused. No torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from jaxlora.config import ModelConfig
from jaxlora.errors import ModelLoadError
from jaxlora.gguf_checkpoint import gguf_file, hf_config, open_gguf, read_tensors
from jaxlora.gguf_tokenizer import load_gguf_tokenizer
from jaxlora.hf_checkpoint import checkpoint_tensors


def export_hf(model: str | Path, out: str | Path) -> Path:
    """Writes the Hugging Face folder of the GGUF that `model` names into `out`; returns `out`."""
    from safetensors.numpy import save_file

    path, out = gguf_file(model), Path(out)
    if path is None:
        raise ModelLoadError(f"{model} names no GGUF file")
    if out.exists():
        raise ModelLoadError(f"{out} exists: give a new folder to export into")
    reader = open_gguf(path)
    config = hf_config(reader, path)
    cfg = ModelConfig.from_hf_dict(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(read_tensors(reader, path, cfg, checkpoint_tensors(cfg)), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        load_gguf_tokenizer(path).save_pretrained(str(tmp))
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a .gguf file (or a folder holding one)")
    parser.add_argument("out", help="the folder to create")
    args = parser.parse_args(argv)
    print(export_hf(args.model, args.out))


if __name__ == "__main__":
    main()
