"""The project's own files: environment.yml delegates to pyproject, the extras exist, the README commands."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_delegates_to_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert pip_sections == [["-e .[dev]"]], "environment.yml must install the package with pip, extras [dev]"
    conda_names = {re.split(r"[<>=! ]", d)[0] for d in deps if isinstance(d, str)}
    assert conda_names == {"python", "pip"}, f"conda deps beyond python/pip drift from pyproject: {conda_names}"
    py_req = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    assert py_req.replace("python", "") == _pyproject()["project"]["requires-python"]
    assert "dev" in _pyproject()["project"]["optional-dependencies"]


def test_extras_of_the_design():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"dev", "oracle", "gpu-cuda12", "gpu-cuda13", "notebooks"} <= set(extras)
    assert "torch==2.13.0" in extras["oracle"]
    assert any(r.startswith("transformers>=5") for r in extras["oracle"])


def test_readme_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_reference_ops_import_with_numpy_only():
    import subprocess
    import sys

    code = ("import sys, nemo_scratch.ops.ssd, nemo_scratch.ops.moe, nemo_scratch.ops.quant, nemo_scratch.backends; "
            "bad = [m for m in ('torch', 'numba', 'cupy', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
