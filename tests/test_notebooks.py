"""Every notebook runs top to bottom against the committed results_small runs and shows its tables and
figures; the committed notebooks carry no outputs."""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIXTURE = ROOT / "tests" / "data" / "results_small"
# A notebook drawn from committed runs of its own (not the small fixture): notebook -> its runs
OWN_RUNS = {"replication": ROOT / "experiments" / "replication" / "runs"}
RESULTS_LINE = re.compile(r'^RESULTS = os.environ.get\("SPEFT_RESULTS", .*$', re.M)


def test_the_four_notebooks_exist_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == ["density", "efficiency", "masks", "metric_ablation", "replication"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: clear its outputs"
        assert nb.cells[0].cell_type == "code" and RESULTS_LINE.search(nb.cells[0].source), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_fixture(path, tmp_path, monkeypatch):
    """Each notebook on the small fixture, or on its own committed runs (OWN_RUNS)."""
    nb = nbformat.read(path, as_version=4)
    results = OWN_RUNS.get(path.stem, FIXTURE)
    # the documented way: SPEFT_RESULTS names the folder (as `SPEFT_RESULTS=<dir> jupyter execute <notebook>`)
    monkeypatch.setenv("SPEFT_RESULTS", str(results))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on a cell's error
    assert f"under {results}" in "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                                         for o in c.outputs if o.output_type == "stream")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("text/markdown" in o.get("data", {}) for o in outputs), "no table shown"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "no figure shown"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Traceback" not in text
