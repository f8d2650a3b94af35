"""Every notebook in notebooks/ executes top to bottom without an error (on the embedded model), has its
outputs committed, and matches its builder script in tools/ (tools/build_<name>.py)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _builder_cells(stem: str) -> list[tuple[str, str]] | None:
    path = ROOT / "tools" / f"build_{stem}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"build_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CELLS


def test_notebooks_exist() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "contrastive"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_matches_builder_and_has_outputs(path: Path) -> None:
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{path.name}: unexecuted cells committed"
    assert sum(bool(c.outputs) for c in code) >= len(code) // 2, f"{path.name}: outputs missing"
    cells = _builder_cells(path.stem)
    assert cells is not None, f"no tools/build_{path.stem}.py for {path.name}"
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        ("markdown" if kind == "md" else "code", src) for kind, src in cells], f"{path.name} is stale: rebuild it"


@pytest.mark.embedded
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.read(str(path), as_version=4)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # the kernel's torch threads
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
