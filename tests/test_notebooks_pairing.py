"""The notebooks' two forms cannot drift, and the committed outputs are those of the committed source.

notebooks/NN_name.py is the source a reviewer diffs; notebooks/NN_name.ipynb is what a student opens, committed
WITH the outputs of executing that source (``make notebooks`` = tools/execute_notebooks.py), so that every
printed number and figure can be read without running anything. The .ipynb carries the digest of the source
it was executed from; a stale one fails here. CI executes the sources again (``pytest --nbmake notebooks``).
"""

import importlib.util
import json
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="comparing notebooks needs jupytext (the notebooks extra)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
_spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "tools" / "execute_notebooks.py")
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)


def cells(nb):
    """What must agree between the two forms: each cell's type, text and tags (outputs excluded)."""
    return [execute_notebooks.cell_key(c) for c in nb.cells]


def test_every_notebook_has_both_forms():
    assert SOURCES, f"no notebook sources NN_*.py found in {NOTEBOOKS}"
    ipynbs = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in SOURCES] == [p.stem for p in ipynbs], (
        "every notebooks/NN_*.py needs its .ipynb and vice versa; run "
        "`jupytext --set-formats ipynb,py:percent notebooks/NN_name.py`")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_cells_equal_py_cells(source):
    paired = source.with_suffix(".ipynb")
    py_nb, ipynb_nb = jupytext.read(source), jupytext.read(paired)
    py_cells, ipynb_cells = cells(py_nb), cells(ipynb_nb)
    assert len(py_cells) == len(ipynb_cells), (
        f"{paired.name} has {len(ipynb_cells)} cells, {source.name} has {len(py_cells)}: run "
        f"`jupytext --sync {source.relative_to(NOTEBOOKS.parent)}`")
    for i, (a, b) in enumerate(zip(py_cells, ipynb_cells)):
        assert a == b, f"cell {i} differs between {source.name} and {paired.name}: run `jupytext --sync`"
    assert ipynb_nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", (
        f"{paired.name} is not paired with its py:percent source (metadata jupytext.formats)")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_holds_fresh_outputs_without_run_noise(source):
    raw = json.loads(source.with_suffix(".ipynb").read_text())
    stamp = raw["metadata"].get("nemo_scratch", {}).get("source_sha256")
    assert stamp == execute_notebooks.source_digest(jupytext.read(source)), (
        f"{source.stem}.ipynb was not executed from the current {source.name}: run `make notebooks`")
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert code, f"{source.stem}.ipynb has no code cells"
    outputs = [o for c in code for o in c["outputs"]]
    assert any(o.get("output_type") == "stream" for o in outputs), f"{source.stem}.ipynb prints nothing"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{source.stem}.ipynb shows no figure"
    for i, c in enumerate(code):
        assert c["execution_count"] is None and c["metadata"].keys() <= {"tags"}, (
            f"{source.stem}.ipynb code cell {i} carries run-to-run noise (execution count or timing metadata)")
        for o in c["outputs"]:
            assert o.get("output_type") != "error", f"{source.stem}.ipynb code cell {i} failed when executed"
            assert o.get("execution_count") is None
    text = json.dumps(outputs)
    assert str(ROOT) not in text, f"{source.stem}.ipynb outputs contain a local path ({ROOT})"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_uses_the_package_and_asserts(source):
    code = "\n".join(c.source for c in jupytext.read(source).cells if c.cell_type == "code")
    assert "import nemo_scratch" in code, f"{source.name} must import the package, not redefine it"
    assert "assert " in code, f"{source.name} must assert what it shows, not only plot it"
