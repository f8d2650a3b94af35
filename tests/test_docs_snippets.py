"""The documentation's examples run: every ```python block of README.md and of docs/**/*.md, and every
``steering-opt`` command line of their ```bash blocks parses.

A page's Python blocks run in order in one namespace (later blocks use earlier names), in a temporary working
directory, on the embedded model: ``steering_opt.load_model()`` without arguments returns the session's embedded
model instead of loading another copy. A block is left out only when the line before it (blank lines aside) is
``<!-- skip-snippet: reason -->`` (for examples that need several GPUs, a launcher or another model). After a page,
the shared model must carry no hook and no ``requires_grad`` parameter, have the same module tree, and be in eval
mode, as the library promises.

Tracebacks point into the Markdown file: a failing block is reported as ``PAGE`` line ``N`` of the page.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import textwrap
import traceback
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)[ \t]*(?P<lang>[\w+-]*)[^`]*$")
SKIP = re.compile(r"^\s*<!--\s*skip-snippet:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    lang: str
    line: int  # 1-based line of the block's first code line in its file
    code: str
    skip: str | None  # the reason given by a skip-snippet marker, else None


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with their language, position and skip marker."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        prev = i - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = SKIP.match(lines[prev]) if prev >= 0 else None
        if marker and not marker.group("reason"):
            raise ValueError(f"line {prev + 1}: a skip-snippet marker needs a reason: <!-- skip-snippet: why -->")
        fence, start = m.group("fence"), i + 1
        i = start
        while i < len(lines) and not re.match(rf"^[ \t]*{fence}[ \t]*$", lines[i]):
            i += 1
        if i == len(lines):
            raise ValueError(f"line {start}: code block not closed")
        code = textwrap.dedent("\n".join(lines[start:i]))
        blocks.append(Block(m.group("lang").lower(), start + 1, code, marker.group("reason") if marker else None))
        i += 1
    return blocks


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


PYTHON_PAGES = [p for p in pages() if any(b.lang == "python" for b in code_blocks(p.read_text(encoding="utf-8")))]


# ----------------------------------------------------------------------------------------- the extractor


def test_code_blocks_positions_languages_and_skip_markers() -> None:
    text = "\n".join([
        "# Title",                        # 1
        "```python",                      # 2
        "x = 1",                          # 3
        "```",                            # 4
        "<!-- skip-snippet: needs a GPU -->",  # 5
        "",                               # 6
        "```python",                      # 7
        "import cuda_only",               # 8
        "```",                            # 9
        "- a list item:",                 # 10
        "  ```bash",                      # 11
        "  steering-opt info x",          # 12
        "  ```",                          # 13
        "````markdown",                   # 14
        "```python",                      # 15
        "not a block of its own",         # 16
        "```",                            # 17
        "````",                           # 18
    ])
    blocks = code_blocks(text)
    assert [(b.lang, b.line, b.code, b.skip) for b in blocks] == [
        ("python", 3, "x = 1", None),
        ("python", 8, "import cuda_only", "needs a GPU"),
        ("bash", 12, "steering-opt info x", None),
        ("markdown", 15, "```python\nnot a block of its own\n```", None),
    ]
    with pytest.raises(ValueError, match="needs a reason"):
        code_blocks("<!-- skip-snippet: -->\n```python\nx = 1\n```")
    with pytest.raises(ValueError, match="not closed"):
        code_blocks("```python\nx = 1\n")


def test_the_pages_have_examples() -> None:
    """The README and every page of the user guide show runnable Python (and so are run below)."""
    ids = {page_id(p) for p in PYTHON_PAGES}
    guide = {page_id(p) for p in (ROOT / "docs" / "guide").glob("*.md")} - {"docs/guide/cli.md"}  # bash only
    assert guide and {"README.md", *guide} <= ids


# ------------------------------------------------------------------------------------ the command lines


def cli_commands(text: str) -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every ``steering-opt`` command in the ```bash / ```sh blocks of a page (backslash
    continuations joined, comments dropped)."""
    out = []
    for block in code_blocks(text):
        if block.lang not in ("bash", "sh", "shell", "console"):
            continue
        logical: list[tuple[int, str]] = []  # (line of the command's first physical line, joined text)
        pending, start = "", 0
        for offset, raw in enumerate(block.code.splitlines()):
            if not pending:
                start = offset
            line = pending + raw
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            logical.append((block.line + start, line))
        for line_no, line in logical:
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "steering-opt":
                out.append((line_no, argv[1:]))
    return out


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_documented_command_lines_parse(page: Path) -> None:
    from steering_opt.cli import build_parser

    for line, argv in cli_commands(page.read_text(encoding="utf-8")):
        try:
            build_parser().parse_args(argv)
            continue
        except SystemExit as e:  # argparse's way out: 0 for --help / --version
            if e.code in (0, None):
                continue
            problem = f"exit {e.code}; the error is printed above"
        except Exception as e:  # the command line's own one-line user errors
            problem = f"{type(e).__name__}: {e}"
        pytest.fail(f"{page_id(page)}:{line}: `steering-opt {shlex.join(argv)}` does not parse ({problem})")


# ------------------------------------------------------------------------------------------ the examples


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_examples_run(page: Path, embedded_model: Any, embedded_tokenizer: Any, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    import steering_opt
    import steering_opt.models

    real_load_model = steering_opt.models.load_model

    def load_model(name_or_path: str | None = None, **kwargs: Any) -> Any:
        if name_or_path is None and not kwargs:
            return embedded_model, embedded_tokenizer
        return real_load_model(name_or_path, **kwargs)

    monkeypatch.setattr(steering_opt.models, "load_model", load_model)
    monkeypatch.setattr(steering_opt, "load_model", load_model, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)

    name = page_id(page)
    modules_before = [(n, type(m)) for n, m in embedded_model.named_modules()]
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block in code_blocks(page.read_text(encoding="utf-8")):
        if block.lang != "python" or block.skip is not None:
            continue
        # pad so that line numbers in a traceback are the Markdown file's
        code = compile("\n" * (block.line - 1) + block.code, name, "exec")
        try:
            exec(code, namespace)
        except Exception:
            pytest.fail(f"{name}: the block at line {block.line} raised:\n{traceback.format_exc()}", pytrace=False)

    hooked = [n or "<model>" for n, m in embedded_model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert not hooked, f"{name} left hooks on the model: {hooked[:5]}"
    assert [(n, type(m)) for n, m in embedded_model.named_modules()] == modules_before, \
        f"{name} left the model's module tree changed (a wrapper not unwrapped?)"
    assert not any(p.requires_grad for p in embedded_model.parameters()), f"{name} left requires_grad on"
    assert not embedded_model.training, f"{name} left the model in train mode"
