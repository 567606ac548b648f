"""The notebooks' two forms cannot drift: each jupytext py:percent source has a paired .ipynb with equal cells.

notebooks/NN_name.py is the source a reviewer diffs; notebooks/NN_name.ipynb is what a student opens. Both are
committed, the .ipynb without outputs. Executing them is a separate job (``pytest --nbmake notebooks``).
"""

import json
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="comparing notebooks needs jupytext (the notebooks extra)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def cells(nb):
    """What must agree between the two forms: each cell's type, text and tags (outputs excluded)."""
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells]


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
def test_ipynb_is_committed_without_outputs(source):
    raw = json.loads(source.with_suffix(".ipynb").read_text())
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert code, f"{source.stem}.ipynb has no code cells"
    for i, c in enumerate(code):
        assert c.get("outputs") == [] and c.get("execution_count") is None, (
            f"{source.stem}.ipynb code cell {i} has outputs; clear them (`jupytext --sync` from the .py does)")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_uses_the_package_and_asserts(source):
    code = "\n".join(c.source for c in jupytext.read(source).cells if c.cell_type == "code")
    assert "import nemo_scratch" in code, f"{source.name} must import the package, not redefine it"
    assert "assert " in code, f"{source.name} must assert what it shows, not only plot it"
