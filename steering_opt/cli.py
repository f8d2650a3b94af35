"""The ``steering-opt`` command line.

User errors (bad option values, a model that is not available) print one line to stderr and exit
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class _UserError(Exception):
    """An error caused by the command line's input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) and exit with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UserError(f"{self.prog}: {message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_device(device: str | None) -> None:
    """Raise ValueError for a device string torch does not know or a backend that is not available."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"invalid --device {device!r}: {str(exc).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available on this machine")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .models import parse_dtype

    dtype = parse_dtype(args.dtype)  # fail fast on a bad --dtype/--device, before loading anything
    _check_device(args.device)
    run_demo(args.model, device=args.device, dtype=dtype, max_new_tokens=args.max_new_tokens, layer=args.layer,
             max_iters=args.max_iters)
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local model folder or HF model id in the local cache "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32 (default for the embedded model), bfloat16, float16 or auto")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = _Parser(prog="steering-opt", description="Find and apply steering vectors for HF causal LMs.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="run the demo on the embedded model")
    _add_model_options(demo)
    demo.add_argument("--max-new-tokens", type=_positive_int, default=40,
                      help="tokens to generate per completion (default: 40)")
    demo.add_argument("--layer", type=int, default=6, help="layer to steer (default: 6)")
    demo.add_argument("--max-iters", type=_positive_int, default=30, help="optimiser steps (default: 30)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``steering-opt`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UserError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    if args.verbose == 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the command's output clean; -v shows progress bars
    try:
        return func(args)
    except (ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        print(f"steering-opt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
