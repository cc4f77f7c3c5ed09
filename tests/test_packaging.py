"""What gets installed: serving and training need no test dependency, every third-party package
the code imports is declared in pyproject.toml itself (not merely pulled in by something else), and
the kernels' C++ sources ship with the package."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_PACKAGES = ("jaxlora", "serve_app", "training")
TEST_ONLY = {"torch", "peft", "pytest", "openai", "httpx", "schemathesis", "psutil", "openai-agents", "pydantic-ai-slim",
             "instructor", "langchain-openai"}


def _name(requirement: str) -> str:
    for sep in "[<>=!~ ;":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("cmd, spec", [("serve", "."), ("demo", "."), ("train", "."), ("test", ".[test]")])
def test_dev_installs_the_test_extra_only_for_tests(cmd, spec):
    out = subprocess.run([str(ROOT / "dev"), "install-spec", cmd], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == spec


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution `requirements` pull in, through the installed packages' own metadata
    (extras and environment markers as pip evaluates them): what their install resolves to."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name, extras = _name(req.name), set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        for dep in distribution(name).requires or []:
            dep = Requirement(dep)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *seen[name])):
                todo.append(dep)
    return set(seen)


def test_runtime_dependencies_pull_in_no_torch_or_peft():
    """`./dev serve` installs `.` (not the test extra), whose dependencies, followed through every
    installed package's metadata, reach no test-only package."""
    spec = subprocess.run([str(ROOT / "dev"), "install-spec", "serve"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert spec == "."
    resolved = _closure(_project()["dependencies"])
    assert {"jax", "ray", "transformers", "optax", "fastapi"} <= resolved  # a real walk, ray's serve extra followed
    assert not resolved & TEST_ONLY, resolved & TEST_ONLY
    assert not any(n.startswith(("nvidia-", "torch")) for n in resolved)
    assert {"torch", "peft"} <= _closure(_project()["optional-dependencies"]["test"])  # the walk finds them


def _imported_top_levels() -> set[str]:
    names = set()
    for package in RUNTIME_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(RUNTIME_PACKAGES)


def test_every_imported_package_is_a_declared_runtime_dependency():
    declared = {_name(r) for r in _project()["dependencies"]}
    dists = packages_distributions()
    imported = _imported_top_levels()
    assert {"jax", "ray", "fastapi", "starlette"} <= imported  # the scan sees the code
    missing = {m: dists.get(m) for m in imported if not {_name(d) for d in dists.get(m, [m])} & declared}
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"
    assert "jinja2" in declared  # transformers renders chat templates with it
    assert not declared & TEST_ONLY


def test_the_kernel_sources_are_found_and_installed_with_the_package():
    """The CPU kernels are compiled from their C++ on first use, so an install must carry every
    source file their build reads, as package data of the package that builds them."""
    from jaxlora import kernels

    sources = kernels._sources()
    assert {"bgmv.cc", "attention.cc"} <= {p.name for p in sources}
    assert all(p.parent == Path(kernels.__file__).parent for p in sources)
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][kernels.__name__]
    assert all(any(fnmatch(p.name, g) for g in globs) for p in sources)


def test_serving_processes_do_not_import_torch(demo_model_dir):
    """Where torch is installed (the tests' venv), the app's processes still do not import it: its
    import costs seconds in every replica (the tokenizer of a Hugging Face folder loads without
    AutoTokenizer's model registry, which pulls torch in)."""
    program = ("import sys; import serve_app.app; from jaxlora.tokenizer import load_tokenizer; "
               f"load_tokenizer({str(demo_model_dir)!r}); print(sorted(m for m in ('torch', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
