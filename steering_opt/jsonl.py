"""JSONL files of training datapoints and contrast pairs: schemas, validated loading, writing.

One JSON object per line; blank lines are skipped. Every problem is reported as a
:class:`JSONLError` (a ``ValueError``) naming the file and the 1-based line number.

Datapoint line (:class:`~steering_opt.data.TrainingDatapoint`)::

    {"prompt": "Tell me a joke.", "dst_completions": ["Sure!"], "src_completions": ["No."]}

Keys: ``prompt`` (string, required); ``dst_completions`` / ``src_completions`` (lists of strings,
completions to promote / suppress; at least one completion overall); optional
``dst_completions_target_losses`` / ``src_completions_target_losses`` (lists of numbers, nats, one per
completion); ``token`` (``null``, an int, a list of ints, or ``{"start": int|null, "stop": int|null}``
for a slice; negative indices count back from the end of the prompt); ``is_negative`` (bool).

Contrast-pair line (contrastive training)::

    {"positive": "I cannot help with that.", "negative": "Sure, here you go."}

Keys: ``positive`` and ``negative`` (required): each a non-empty string, or a chat, i.e. a list of
``{"role": ..., "content": ...}`` messages rendered with the tokenizer's chat template (a final assistant
message is left open, so its last token is read)::

    {"positive": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
     "negative": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

Unknown keys are errors (a misspelt key would otherwise be silently ignored).

Limits: the file must be a regular file or a pipe (a device such as ``/dev/zero`` is refused), and a line may
hold at most :data:`MAX_LINE_BYTES` (32 MiB): a longer line is an error at that line, read no further.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .data import TrainingDatapoint
from .fsutil import atomic_write_file

__all__ = [
    "CONTRAST_PAIR_KEYS",
    "DATAPOINT_KEYS",
    "JSONLError",
    "datapoint_to_json",
    "iter_jsonl",
    "iter_lines",
    "load_contrast_pairs",
    "load_datapoints",
    "parse_contrast_pair",
    "parse_datapoint",
    "write_datapoints",
]

DATAPOINT_KEYS: tuple[str, ...] = (
    "prompt",
    "dst_completions",
    "src_completions",
    "dst_completions_target_losses",
    "src_completions_target_losses",
    "token",
    "is_negative",
)
CONTRAST_PAIR_KEYS: tuple[str, ...] = ("positive", "negative")
#: Longest line a JSONL or prompts file may have, in bytes (32 MiB).
MAX_LINE_BYTES = 32 << 20


class JSONLError(ValueError):
    """A JSONL file (or one of its lines) does not follow its schema."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = f"{path}:{line}: " if path is not None and line is not None else f"{path}: " if path else ""
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line


def iter_lines(path: str | os.PathLike[str], what: str = "JSONL file") -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each line of a UTF-8 text file (a BOM dropped), reading one line at a
    time and never more than :data:`MAX_LINE_BYTES` of one line.

    Raises:
        FileNotFoundError: the file does not exist.
        JSONLError: a folder or a device rather than a file; a line over the limit; not UTF-8.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such file") from None
    if stat.S_ISDIR(mode):
        raise JSONLError(f"is a folder, expected a {what}", str(p))
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise JSONLError(f"is not a regular file (a device or socket), expected a {what}", str(p))
    with p.open("rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise JSONLError(f"the line is longer than {MAX_LINE_BYTES:,} bytes; refusing to read it",
                                 str(p), number)
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise JSONLError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", str(p), number) from None
            yield number, text


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_object)`` for each non-blank line of a JSONL file (:func:`iter_lines`).

    Raises:
        FileNotFoundError: the file does not exist.
        JSONLError: a line is not valid JSON / not UTF-8 / too long; not a regular file.
    """
    p = Path(path)
    for number, text in iter_lines(p):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JSONLError(f"invalid JSON at column {exc.colno}: {exc.msg}", str(p), number) from None
        except (ValueError, RecursionError) as exc:  # integers over Python's digit limit, absurd nesting
            raise JSONLError(f"unreadable JSON ({type(exc).__name__}: {str(exc)[:100]})", str(p), number) from None
        yield number, obj


def _check_keys(obj: Any, allowed: tuple[str, ...], required: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object (one {what} per line), got {type(obj).__name__}")
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed keys: {', '.join(allowed)}"
        raise ValueError(f"unknown key {key!r}{hint}")
    for key in required:
        if key not in obj:
            raise ValueError(f"missing required key {key!r}")
    return obj


def _string_list(obj: dict[str, Any], key: str) -> list[str]:
    value = obj.get(key, [])
    if value is None:
        return []
    if isinstance(value, str):
        raise ValueError(f"{key!r} must be a list of strings, got a single string; write [{json.dumps(value)}]")
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{key}[{i}] must be a string, got {type(item).__name__}")
        if not item:
            raise ValueError(f"{key}[{i}] is an empty string")
    return value


def _number_list(obj: dict[str, Any], key: str) -> list[float] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in value):
        raise ValueError(f"{key!r} must be a list of numbers (nats), got {json.dumps(value)[:80]}")
    try:
        return [float(x) for x in value]
    except OverflowError:
        raise ValueError(f"{key!r} holds a number too large for a float") from None


def _token(value: Any) -> int | slice | list[int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("'token' must be null, an int, a list of ints or {\"start\": ..., \"stop\": ...}, got a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        if not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ValueError(f"'token' list must hold ints, got {json.dumps(value)[:80]}")
        return value
    if isinstance(value, dict):
        extra = set(value) - {"start", "stop"}
        if extra:
            raise ValueError(f"'token' slice takes only 'start' and 'stop', got {sorted(extra)}")
        for k in ("start", "stop"):
            x = value.get(k)
            if x is not None and (isinstance(x, bool) or not isinstance(x, int)):
                raise ValueError(f"'token'.{k} must be an int or null, got {json.dumps(x)}")
        return slice(value.get("start"), value.get("stop"))
    raise ValueError(f"'token' must be null, an int, a list of ints or {{\"start\": ..., \"stop\": ...}}, "
                     f"got {type(value).__name__}")


def parse_datapoint(obj: Any) -> TrainingDatapoint:
    """Validate one parsed JSON object against the datapoint schema (module docstring).

    Raises:
        ValueError: naming the offending key.
    """
    obj = _check_keys(obj, DATAPOINT_KEYS, ("prompt",), "datapoint")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"'prompt' must be a non-empty string, got {json.dumps(prompt)[:80]}")
    is_negative = obj.get("is_negative", False)
    if not isinstance(is_negative, bool):
        raise ValueError(f"'is_negative' must be true or false, got {json.dumps(is_negative)}")
    try:
        return TrainingDatapoint(
            prompt=prompt,
            src_completions=_string_list(obj, "src_completions"),
            dst_completions=_string_list(obj, "dst_completions"),
            src_completions_target_losses=_number_list(obj, "src_completions_target_losses"),
            dst_completions_target_losses=_number_list(obj, "dst_completions_target_losses"),
            token=_token(obj.get("token")),
            is_negative=is_negative,
        )
    except TypeError as exc:
        raise ValueError(str(exc).removeprefix("TrainingDatapoint: ")) from None
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("TrainingDatapoint: ")) from None


def parse_contrast_pair(obj: Any) -> Any:
    """Validate one parsed JSON object against the contrast-pair schema.

    Returns a ``steering_opt.contrastive.ContrastPair`` when that class is available, else a
    ``(positive, negative)`` tuple.
    """
    obj = _check_keys(obj, CONTRAST_PAIR_KEYS, CONTRAST_PAIR_KEYS, "contrast pair")
    for key in CONTRAST_PAIR_KEYS:
        value = obj[key]
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{key!r} is an empty list of chat messages")
            for i, m in enumerate(value):
                if not isinstance(m, dict) or set(m) != {"role", "content"} or \
                        not all(isinstance(m[k], str) for k in ("role", "content")):
                    raise ValueError(f"{key}[{i}] must be a chat message {{\"role\": str, \"content\": str}}, "
                                     f"got {json.dumps(m)[:80]}")
        elif not isinstance(value, str) or not value:
            raise ValueError(f"{key!r} must be a non-empty string or a list of chat messages, got "
                             f"{json.dumps(value)[:80]}")
    try:
        from .contrastive import ContrastPair
    except ImportError:
        return (obj["positive"], obj["negative"])
    return ContrastPair(positive=obj["positive"], negative=obj["negative"])


def _load(path: str | os.PathLike[str], parse: Any, what: str) -> list[Any]:
    out = []
    for number, obj in iter_jsonl(path):
        try:
            out.append(parse(obj))
        except ValueError as exc:
            raise JSONLError(str(exc), str(path), number) from None
    if not out:
        raise JSONLError(f"no {what}s (the file is empty)", str(path))
    return out


def load_datapoints(path: str | os.PathLike[str]) -> list[TrainingDatapoint]:
    """Read and validate a datapoints JSONL file (schema in the module docstring)."""
    return _load(path, parse_datapoint, "datapoint")


def load_contrast_pairs(path: str | os.PathLike[str]) -> list[Any]:
    """Read and validate a contrast-pairs JSONL file (``{"positive": ..., "negative": ...}`` per line)."""
    return _load(path, parse_contrast_pair, "contrast pair")


def datapoint_to_json(dp: TrainingDatapoint) -> dict[str, Any]:
    """The JSON object of one datapoint (inverse of :func:`parse_datapoint`; defaults omitted)."""
    out: dict[str, Any] = {"prompt": dp.prompt}
    if dp.dst_completions:
        out["dst_completions"] = list(dp.dst_completions)
    if dp.src_completions:
        out["src_completions"] = list(dp.src_completions)
    for key in ("dst_completions_target_losses", "src_completions_target_losses"):
        if getattr(dp, key) is not None:
            out[key] = list(getattr(dp, key))
    tok = dp.token
    if isinstance(tok, slice):
        if tok.step not in (None, 1):
            raise ValueError(f"token slice step {tok.step} cannot be written (only step 1 is supported)")
        out["token"] = {"start": tok.start, "stop": tok.stop}
    elif tok is not None:
        out["token"] = list(tok) if isinstance(tok, (list, tuple)) else tok
    if dp.is_negative:
        out["is_negative"] = True
    return out


def write_datapoints(datapoints: Iterable[TrainingDatapoint], path: str | os.PathLike[str]) -> Path:
    """Write datapoints as JSONL, atomically (temporary file + rename)."""
    lines = [json.dumps(datapoint_to_json(dp), ensure_ascii=False) for dp in datapoints]

    def write(tmp: Path) -> None:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    return atomic_write_file(path, write)
