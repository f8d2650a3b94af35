"""Every notebook in notebooks/ executes top to bottom without an error (on the embedded model), has its
outputs committed (clean: no warnings, machine paths or progress-bar fragments), and matches its builder script
in tools/ (tools/build_<name>.py); in a fresh kernel a plot displays as a PNG and progress bars are on."""

from __future__ import annotations

import importlib.util
import os
import re
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


#: What a committed output must not contain: warnings, paths of the machine that ran it, progress-bar renderings.
UNCLEAN = {
    "a warning": re.compile(r"\w+Warning\b|^WARNING\b", re.M),
    "a machine path": re.compile(r"(?<![\w.])/(?:root|work|home|tmp|Users)/|site-packages|[A-Z]:\\Users"),
    "a progress bar": re.compile(r"\d+%\|[^|\n]*\|\s*\S+/\S+\s*\["),
    "a carriage return": re.compile(r"\r"),
}


def _output_texts(nb: nbformat.NotebookNode) -> list[tuple[int, str]]:
    out = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append((i, o.text))
            elif o.output_type in ("execute_result", "display_data"):
                out.append((i, str(o.data.get("text/plain", ""))))
            elif o.output_type == "error":
                out.append((i, "\n".join(o.traceback)))
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs_are_clean(path: Path) -> None:
    nb = nbformat.read(str(path), as_version=4)
    for i, text in _output_texts(nb):
        for what, pattern in UNCLEAN.items():
            m = pattern.search(text)
            context = "" if m is None else text[max(0, m.start() - 80):m.end() + 80]
            assert m is None, f"{path.name}, cell {i}: {what} in the output: {context!r}"
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "%matplotlib" not in sources  # figures display without it


def test_quickstart_plots_the_loss_curve() -> None:
    nb = nbformat.read(str(ROOT / "notebooks" / "quickstart.ipynb"), as_version=4)
    heading = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "Loss curve" in c.source)
    cell = nb.cells[heading + 1]
    assert "plot_loss_curve" in cell.source
    assert [o for o in cell.outputs if "image/png" in o.get("data", {})], "the loss curve is not drawn"


def test_fresh_kernel_shows_a_plot_once_as_png_and_progress_is_on() -> None:
    """No ``%matplotlib inline``, no pyplot: the first plot of a fresh kernel is the cell's PNG result, shown
    once; progress bars default to on in Jupyter; importing the package's functions and then transformers
    prints no tqdm "IProgress not found" warning."""
    cells = [
        "import steering_opt\nsteering_opt.TrainingDatapoint\nimport transformers\n"
        "print(steering_opt.progress.show_progress(None))",
        "steering_opt.plot_loss_curve([3.0, 2.0, 1.5])",
        "%matplotlib inline\nsteering_opt.plot_layer_norms({0: 1.0, 1: 2.0})",
    ]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    first, plot, inline = (c.outputs for c in nb.cells)
    assert [(o.output_type, o.get("name"), o.get("text")) for o in first] == [("stream", "stdout", "True\n")]
    for outputs in (plot, inline):
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1 and images[0].output_type == "execute_result", outputs
        assert images[0].data["image/png"]  # base64 PNG
        assert not [o for o in outputs if o.output_type == "stream"], outputs


@pytest.mark.embedded
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.read(str(path), as_version=4)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # the kernel's torch threads
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
