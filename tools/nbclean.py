"""Tidy a freshly executed notebook's outputs before it is committed (used by tools/build_*.py).

Progress bars (ours and transformers' "Loading weights") are drawn on stderr as many ``\\r``-separated fragments
whose timings change on every run; they are dropped, and consecutive stream outputs are merged, so the committed
notebook shows what a reader needs (prints, tables, figures) and diffs only when results change.
"""

from __future__ import annotations

import re
from typing import Any

#: One rendering of a tqdm bar: ``desc: 40%|####      | 2/5 [00:01<00:02, 1.5it/s, loss=3.2]``.
_BAR = re.compile(r"\d+%\|[^|]*\|\s*\S+/\S+\s*\[.*\]\s*$")


def is_progress(text: str) -> bool:
    """Whether ``text`` (a stderr stream output) consists only of progress-bar renderings and blank space."""
    return all(not seg.strip() or _BAR.search(seg) for seg in re.split(r"[\r\n]", text))


def clean_outputs(nb: Any) -> Any:
    """Drop progress-bar stderr outputs and merge consecutive stream outputs of the same stream, in place."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept: list[Any] = []
        for out in cell.outputs:
            if out.output_type == "stream":
                if out.name == "stderr" and is_progress(out.text):
                    continue
                if kept and kept[-1].output_type == "stream" and kept[-1].name == out.name:
                    kept[-1].text += out.text
                    continue
            kept.append(out)
        cell.outputs = kept
    return nb
