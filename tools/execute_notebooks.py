"""Execute the notebooks and write their outputs into the committed .ipynb files (what `make notebooks` runs).

For each ``notebooks/NN_name.py`` (the jupytext py:percent source: the file to edit and review):

1. read it with jupytext and execute it in a fresh ``python3`` kernel, from ``notebooks/`` (nbclient, the
   engine nbmake uses in CI);
2. keep what a reader needs (printed text, figures as PNG) and drop what changes from run to run without
   changing the content: execution counts, per-cell timing metadata, the kernel's version strings; cell ids
   are derived from the cell's position and text, so an unchanged cell keeps its id;
3. stamp the notebook metadata with ``nemo_scratch.source_sha256``, the digest of the source's cells, so that
   tests/test_notebooks_pairing.py can tell a stale .ipynb (source edited since) from a fresh one;
4. write ``NN_name.ipynb``, paired with its source (jupytext ``formats: ipynb,py:percent``).

Nothing is written for a notebook that fails. Each notebook's execution time is printed.

    python tools/execute_notebooks.py                              # all of notebooks/NN_*.py
    python tools/execute_notebooks.py notebooks/04_mtp_speculative.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
JUPYTEXT = {"cell_metadata_filter": "-all", "formats": "ipynb,py:percent"}


def cell_key(cell):
    """What defines a cell's content: type, text (stripped) and tags. Outputs are not part of it."""
    return [cell.cell_type, cell.source.strip(), sorted(cell.metadata.get("tags", []))]


def source_digest(nb):
    """sha256 of the cells of a notebook (as jupytext reads it), the stamp a fresh .ipynb carries."""
    return hashlib.sha256(json.dumps([cell_key(c) for c in nb.cells]).encode()).hexdigest()


def _clean(nb, digest):
    """Drop run-to-run noise, keep outputs; fix the metadata and cell ids."""
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags")
        cell.metadata = {"tags": tags} if tags else {}
        cell.id = hashlib.sha1(f"{i}:{cell.cell_type}:{cell.source}".encode()).hexdigest()[:8]
        if cell.cell_type == "code":
            cell.execution_count = None
            for out in cell.outputs:
                if "execution_count" in out:
                    out["execution_count"] = None
    nb.metadata = {"jupytext": dict(JUPYTEXT), "kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"},
                   "nemo_scratch": {"source_sha256": digest,
                                    "refresh": "make notebooks (python tools/execute_notebooks.py)"}}
    return nb


def execute(source: Path, timeout: int = 600) -> float:
    """Execute ``source`` and write its paired .ipynb with outputs; returns the seconds it took."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(source)
    digest = source_digest(nb)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(source.parent)}}).execute()
    seconds = time.perf_counter() - start
    nbformat.validate(_clean(nb, digest))
    nbformat.write(nb, source.with_suffix(".ipynb"))
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path, help="notebook sources (default: notebooks/NN_*.py)")
    args = parser.parse_args(argv)
    sources = args.sources or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    failed = []
    for source in sources:
        try:
            seconds = execute(source.resolve())
        except Exception as exc:  # a failing notebook: report it, keep its committed .ipynb, go on
            print(f"FAILED {source}: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}")
            failed.append(source)
            continue
        print(f"{source.name}: executed in {seconds:.1f} s, outputs written to {source.with_suffix('.ipynb').name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
