"""The command line's argument layer: one-line argparse errors, number types, the optimiser flags generated from
:class:`~steering_opt.options.OptimizeOptions`, the model and datapoint flags every command shares, and reading the
inputs they name (datapoints, prompt files, output paths), all checked before a model is loaded.

Like :mod:`steering_opt.cli`, this module imports the library (hence torch) only inside the functions that need it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "FLOAT",
    "INT",
    "NONNEG_FLOAT",
    "NONNEG_INT",
    "POS_FLOAT",
    "POS_INT",
    "SEED",
    "TEMPERATURE",
    "Parser",
    "UserError",
    "add_datapoint_options",
    "add_model_options",
    "add_option_flags",
    "add_vector_option",
    "apply_chat",
    "chat_prompt",
    "check_model_options",
    "check_output",
    "check_unique",
    "did_you_mean",
    "number_type",
    "option_flag",
    "options_from_args",
    "or_none",
    "read_datapoints",
    "read_prompts_file",
    "read_vectors",
    "shorten",
]

#: Generated flags spelt as in earlier releases (the rest: ``option_flag``).
FLAG_NAMES = {"do_tangent_space_noise": "--tangent-noise"}


class UserError(Exception):
    """An error caused by the command line's input, reported as one line."""


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to about ``limit`` characters (head and tail kept, the number left out said), so that an
    error never echoes a huge argument back."""
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 20, 10)
    return f"{text[:keep]}... ({len(text) - 2 * keep:,} characters left out) ...{text[-keep:]}"


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate to a mistyped ``word`` (difflib), else ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) and exit with status 2, a mistyped option,
    choice or subcommand gets a "did you mean" suggestion, and the functions in ``deferred`` (which add
    arguments that need the library, hence torch) run only when this parser is used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferred: list[Callable[[argparse.ArgumentParser], None]] = []
        self.commands: dict[str, Parser] = {}  # the subcommands' parsers, filled by add_command

    def add_command(self, sub: Any, name: str, **kwargs: Any) -> Parser:
        """``sub.add_parser(name, **kwargs)`` (``sub``: this parser's ``add_subparsers()``), remembered for
        suggestions."""
        parser: Parser = sub.add_parser(name, **kwargs)
        self.commands[name] = parser
        return parser

    def option_strings(self) -> list[str]:
        """Every option string this parser accepts (``--max-iters``, ``-v``, ...)."""
        while self.deferred:
            self.deferred.pop(0)(self)
        return [o for action in self._actions for o in action.option_strings]

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        while self.deferred:
            self.deferred.pop(0)(self)
        return super().parse_known_args(args, namespace)

    def _check_flags(self, argv: Sequence[str]) -> None:
        """Refuse an unknown ``--flag`` of the subcommand with a suggestion, before argparse reports anything
        else (such as missing required arguments)."""
        name = next((a for a in argv if not a.startswith("-")), None)
        command = self.commands.get(name or "")
        if command is None:
            return
        options = command.option_strings()
        for arg in argv[argv.index(name) + 1:]:
            if arg == "--":
                break
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and not any(o.startswith(flag) for o in options):
                raise UserError(f"{command.prog}: unrecognized argument {shorten(flag)}"
                                f"{did_you_mean(flag, options)} (see {command.prog} --help)")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self.commands:
            self._check_flags(list(sys.argv[1:] if args is None else args))
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(ns, "command", None) or "")
            prog, options = (command.prog, command.option_strings()) if command else (self.prog, [])
            options += self.option_strings()
            flag = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), None)
            hint = did_you_mean(flag, options) if flag else ""
            raise UserError(f"{prog}: unrecognized arguments: {shorten(' '.join(extras))}{hint} (see {prog} --help)")
        return ns

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            message += did_you_mean(m.group(1), re.findall(r"'([^']*)'", m.group(2)) or m.group(2).split(", "))
        raise UserError(f"{self.prog}: {shorten(message, 400)} (see --help)")


# ------------------------------------------------------------------------------------ argument types


def number_type(cast: Callable[[str], float], low: float | None = None, *,
                strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite number (``cast`` is int or float), ``>= low`` (``> low`` if ``strict``)."""
    expected = ("an integer" if cast is int else "a number") + ("" if low is None else
                                                               f" {'>' if strict else '>='} {low:g}")

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (low is not None and (value < low or (strict and value == low))):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shorten(repr(text), 60)}")
        return value

    return parse


#: The smallest sampling temperature: below it sampling is greedy in all but name, and dividing the logits by it
#: overflows (``--temperature 1e-300`` makes them infinite, and sampling from NaN probabilities fails).
MIN_TEMPERATURE = 1e-4


def TEMPERATURE(text: str) -> float:  # noqa: N802 - an argparse type, named like the others
    """An argparse type: a sampling temperature, 0 (greedy) or a finite number >= :data:`MIN_TEMPERATURE`."""
    value = NONNEG_FLOAT(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"expected 0 (greedy) or a temperature >= {MIN_TEMPERATURE:g}, got "
                                         f"{shorten(repr(text), 60)} (smaller ones overflow the logits; use 0 for "
                                         "greedy decoding)")
    return value


def SEED(text: str) -> int:  # noqa: N802 - an argparse type, named like the others
    """An argparse type: a seed, an int in ``[0, 2**63 - 1]`` (:func:`steering_opt.validate.seed`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {shorten(repr(text), 60)}") \
            from None
    if not 0 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {shorten(text, 60)}")
    return value


def or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, with ``none`` meaning None."""
    return lambda text: None if text.lower() == "none" else parse(text)


INT, POS_INT, NONNEG_INT = number_type(int), number_type(int, 0, strict=True), number_type(int, 0)
FLOAT, POS_FLOAT, NONNEG_FLOAT = number_type(float), number_type(float, 0, strict=True), number_type(float, 0)


# ---------------------------------------------------------------------------------- optimiser flags


def option_flag(field: str) -> str:
    """The flag of an OptimizeOptions field: ``max_iters`` -> ``--max-iters``, ``do_one_minus`` -> ``--one-minus``."""
    return FLAG_NAMES.get(field) or "--" + field.removeprefix("do_").replace("_", "-")


def add_option_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = (),
                     defaults: dict[str, Any] | None = None) -> None:
    """One flag per command-line field of OptimizeOptions (name, type, default and help from the field; bools as
    ``--x/--no-x``, optional values also take ``none``); the fields are recorded as ``args.option_fields``."""
    from .options import OptimizeOptions

    parsers: dict[str, Callable[[str], Any]] = {"int": INT, "float": FLOAT, "str": str}
    g = p.add_argument_group("optimiser options (steering_opt.OptimizeOptions)")
    names = []
    for f in dataclasses.fields(OptimizeOptions):
        if not f.metadata.get("cli", True) or f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind, optional = str(f.type).removesuffix(" | None"), str(f.type).endswith(" | None")
        if kind == "bool":
            action = g.add_argument(option_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                    default=default)
        else:
            action = g.add_argument(option_flag(f.name), dest=f.name, default=default, metavar=kind.upper(),
                                    type=or_none(parsers[kind]) if optional else parsers[kind])
        action.help = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        names.append(f.name)
    if "do_target_loss_sum" in names:
        g.add_argument("--per-completion-target", dest="do_target_loss_sum", action="store_false",
                       default=argparse.SUPPRESS, help="every completion must reach --target-loss "
                                                       "(= --no-target-loss-sum)")
    p.set_defaults(option_fields=tuple(names))


def options_from_args(args: argparse.Namespace) -> Any:
    """The OptimizeOptions of the generated flags; an invalid value is a user error naming its flag."""
    from .options import OptimizeOptions

    try:
        return OptimizeOptions(**{name: getattr(args, name) for name in args.option_fields})
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name in args.option_fields:
            message = message.replace(f"`{name}`", option_flag(name))
        raise UserError(message) from None


# ---------------------------------------------------------------------------- shared flags and inputs


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype (checked by :func:`check_model_options`)."""
    p.add_argument("--model", default=None,
                   help="local model folder or HF model id in the local cache "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32 (default for the embedded model), bfloat16, float16 or auto")


def add_datapoint_options(p: argparse.ArgumentParser) -> None:
    """--datapoints FILE, or --prompt with --dst/--src; --chat (read by :func:`read_datapoints`)."""
    g = p.add_argument_group("datapoints (a JSONL file, or one datapoint from flags)")
    g.add_argument("--datapoints", metavar="FILE", default=None,
                   help="JSONL file, one datapoint per line (schema: README, section JSONL files)")
    g.add_argument("--prompt", default=None, help="prompt of a single datapoint")
    g.add_argument("--dst", nargs="+", metavar="TEXT", default=None, help="completion(s) to promote")
    g.add_argument("--src", nargs="+", metavar="TEXT", default=None, help="completion(s) to suppress")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template (a user turn + generation prompt)")


def check_model_options(args: argparse.Namespace) -> Any:
    """Fail fast on a bad --dtype/--device, before reading data or loading anything; returns the dtype."""
    from .models import parse_dtype

    dtype = parse_dtype(args.dtype)
    if args.device is not None:
        import torch

        try:
            kind = torch.device(args.device).type
        except RuntimeError as exc:
            raise ValueError(f"invalid --device {args.device!r}: {str(exc).splitlines()[0]}") from None
        backend = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(kind)
        if backend is not None and not backend.is_available():
            raise ValueError(f"--device {args.device!r}: {kind.upper()} is not available on this machine")
    return dtype


def check_unique(flag: str, values: Sequence[int] | None) -> None:
    if values is not None and len(set(values)) != len(values):
        raise UserError(f"{flag} lists a layer twice: {shorten(str(list(values)))}")


def check_output(path: str, kind: str) -> Path:
    """Fail before any expensive work if an output path cannot be used; ``kind``: ``"save"`` (a vector save
    target: folder or .safetensors), ``"file"`` or ``"folder"``."""
    p = Path(path)
    if kind == "save":
        from .persist import check_save_target

        check_save_target(p)
    elif kind == "file" and p.is_dir():
        raise IsADirectoryError(f"{p}: is a folder, expected a file path")
    elif kind == "folder" and p.exists() and not p.is_dir():
        raise FileExistsError(f"{p}: exists and is not a folder")
    return p


def chat_prompt(tokenizer: Any, text: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template")
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_datapoints(args: argparse.Namespace) -> list[Any]:
    """Datapoints from --datapoints FILE or from --prompt/--dst/--src (validated, before loading a model)."""
    from .data import TrainingDatapoint
    from .jsonl import load_datapoints

    if args.datapoints is not None:
        if args.prompt is not None or args.dst or args.src:
            raise UserError("give either --datapoints FILE or --prompt/--dst/--src, not both")
        return load_datapoints(args.datapoints)
    if args.prompt is None:
        raise UserError("no datapoints: give --datapoints FILE.jsonl, or --prompt TEXT with --dst/--src completions")
    if not args.dst and not args.src:
        raise UserError("--prompt needs at least one completion: --dst TEXT (promote) and/or --src TEXT (suppress)")
    return [TrainingDatapoint(args.prompt, src_completions=list(args.src or []), dst_completions=list(args.dst or []))]


def apply_chat(datapoints: list[Any], tokenizer: Any) -> list[Any]:
    return [dataclasses.replace(dp, prompt=chat_prompt(tokenizer, dp.prompt)) for dp in datapoints]


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: one per line (.txt), or ``{"prompt": ...}`` per line (.jsonl)."""
    from .jsonl import JSONLError, iter_jsonl, iter_lines

    p = Path(path)
    if p.suffix != ".jsonl":  # line by line, each at most jsonl.MAX_LINE_BYTES; not from a device
        return [line.rstrip("\r\n") for _, line in iter_lines(p, "prompts file") if line.strip()]

    prompts = []
    for number, obj in iter_jsonl(p):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise JSONLError('expected {"prompt": "..."}', str(p), number)
        prompts.append(obj["prompt"])
    return prompts


def add_vector_option(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """--vector PATH [MULTIPLIER] (repeatable; read by :func:`read_vectors`)."""
    p.add_argument("--vector", action="append", nargs="+", metavar=("PATH", "MULTIPLIER"), default=None,
                   required=required,
                   help="saved vector (folder, .safetensors, set folder, .gguf) and an optional multiplier "
                        "(default 1); repeatable")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="apply vectors made for another architecture/layer count (same hidden size)")


def read_vectors(specs: list[list[str]] | None) -> list[tuple[str, Any, float]]:
    """``(where, SteeringVector, multiplier)`` for each ``--vector PATH [MULTIPLIER]`` (each member of a set),
    read and verified before any model is loaded."""
    from .persist import load

    out = []
    for spec in specs or []:
        if len(spec) > 2:
            raise UserError(f"--vector takes PATH [MULTIPLIER], got {len(spec)} values: {shorten(str(spec))}")
        try:
            mult = FLOAT(spec[1]) if len(spec) == 2 else 1.0
        except argparse.ArgumentTypeError:
            raise UserError(f"--vector {shorten(spec[0])}: multiplier must be a number, got "
                            f"{shorten(repr(spec[1]), 60)}") from None
        obj = load(spec[0])
        for name, vec in (obj.items() if isinstance(obj, dict) else [(None, obj)]):
            out.append((spec[0] if name is None else f"{spec[0]} [{name}]", vec, mult))
    return out
