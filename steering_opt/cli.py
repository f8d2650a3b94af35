"""The ``steering-opt`` command line, a thin layer over the library.

``optimize`` (:func:`steering_opt.optimize.optimize`, one flag per :class:`~steering_opt.options.OptimizeOptions`
field), ``train`` (contrastive vectors), ``generate``, ``sweep`` (:func:`steering_opt.sweep.sweep`), ``export``
(GGUF, .pt/.npy/.npz), ``info`` and ``demo``. User errors (bad option values, a missing or malformed file, an
unavailable model, an unknown layer) print one line to stderr and exit with status 2; no traceback. The library is
imported inside the commands, and flags that need it are added only when their subcommand is parsed, so
``steering-opt --help`` imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
AGGREGATORS = ("mean", "pca", "logistic")
EXPORT_FORMATS = ("gguf", "pt", "npy", "npz")
#: ``optimize --joint`` (one plain vector per layer) refuses the first fields and needs it for the second.
SINGLE_ONLY = ("vector_clamp", "affine_rank", "noise_scale", "do_output_constr")
JOINT_ONLY = ("regularization_weight", "sparsity_weight", "entropy_weight")
#: OptimizeOptions fields that ``sweep`` sets itself (its variants and seed) or cannot use (affine maps and
#: per-layer regularisers).
SWEEP_MANAGED = ("seed", "max_norm", "vector_clamp", "affine_rank", "max_affine_norm", "starting_affine_norm",
                 "regularization_weight", "regularization_type", "sparsity_weight", "entropy_weight")
#: Generated flags spelt as in earlier releases (the rest: ``_flag``).
FLAG_NAMES = {"do_tangent_space_noise": "--tangent-noise"}


class _UserError(Exception):
    """An error caused by the command line's input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) and exit with status 2, and the functions in
    ``deferred`` (which add arguments that need the library, hence torch) run only when this parser is used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        while self.deferred:
            self.deferred.pop(0)(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        raise _UserError(f"{self.prog}: {message} (see --help)")


# ------------------------------------------------------------------------------------ argument types


def _number(cast: Callable[[str], float], low: float | None = None, *, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite number (``cast`` is int or float), ``>= low`` (``> low`` if ``strict``)."""
    expected = ("an integer" if cast is int else "a number") + ("" if low is None else
                                                               f" {'>' if strict else '>='} {low:g}")

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (low is not None and (value < low or (strict and value == low))):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, with ``none`` meaning None."""
    return lambda text: None if text.lower() == "none" else parse(text)


_INT, _POS_INT, _NONNEG_INT = _number(int), _number(int, 0, strict=True), _number(int, 0)
_FLOAT, _POS_FLOAT, _NONNEG_FLOAT = _number(float), _number(float, 0, strict=True), _number(float, 0)


def _flag(field: str) -> str:
    """The flag of an OptimizeOptions field: ``max_iters`` -> ``--max-iters``, ``do_one_minus`` -> ``--one-minus``."""
    return FLAG_NAMES.get(field) or "--" + field.removeprefix("do_").replace("_", "-")


def _add_option_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = (),
                      defaults: dict[str, Any] | None = None) -> None:
    """One flag per command-line field of OptimizeOptions (name, type, default and help from the field; bools as
    ``--x/--no-x``, optional values also take ``none``); the fields are recorded as ``args.option_fields``."""
    from .options import OptimizeOptions

    parsers: dict[str, Callable[[str], Any]] = {"int": _INT, "float": _FLOAT, "str": str}
    g = p.add_argument_group("optimiser options (steering_opt.OptimizeOptions)")
    names = []
    for f in dataclasses.fields(OptimizeOptions):
        if not f.metadata.get("cli", True) or f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind, optional = str(f.type).removesuffix(" | None"), str(f.type).endswith(" | None")
        if kind == "bool":
            action = g.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        else:
            action = g.add_argument(_flag(f.name), dest=f.name, default=default, metavar=kind.upper(),
                                    type=_or_none(parsers[kind]) if optional else parsers[kind])
        action.help = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        names.append(f.name)
    if "do_target_loss_sum" in names:
        g.add_argument("--per-completion-target", dest="do_target_loss_sum", action="store_false",
                       default=argparse.SUPPRESS, help="every completion must reach --target-loss "
                                                       "(= --no-target-loss-sum)")
    p.set_defaults(option_fields=tuple(names))


def _options(args: argparse.Namespace) -> Any:
    """The OptimizeOptions of the generated flags; an invalid value is a user error naming its flag."""
    from .options import OptimizeOptions

    try:
        return OptimizeOptions(**{name: getattr(args, name) for name in args.option_fields})
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name in args.option_fields:
            message = message.replace(f"`{name}`", _flag(name))
        raise _UserError(message) from None


# ------------------------------------------------------------------------------------ shared helpers


def _check_model_options(args: argparse.Namespace) -> Any:
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


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=_check_model_options(args))


def _model_label(args: argparse.Namespace) -> str:
    from .models import EMBEDDED_MODEL_NAME

    return args.model or EMBEDDED_MODEL_NAME


def _fingerprint(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from .arch import model_fingerprint

    return {**model_fingerprint(model), "name_or_path": _model_label(args)}


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _norms(vector: Any, fmt: str = ".3g") -> str:
    return ", ".join(f"{k}: {float(v.norm()):{fmt}}" for k, v in sorted(vector.layer_activations.items()))


def _check_unique(flag: str, values: Sequence[int] | None) -> None:
    if values is not None and len(set(values)) != len(values):
        raise _UserError(f"{flag} lists a layer twice: {list(values)}")


def _check_output(path: str, kind: str) -> Path:
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


def _chat(tokenizer: Any, text: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template")
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _read_datapoints(args: argparse.Namespace) -> list[Any]:
    """Datapoints from --datapoints FILE or from --prompt/--dst/--src (validated, before loading a model)."""
    from .data import TrainingDatapoint
    from .jsonl import load_datapoints

    if args.datapoints is not None:
        if args.prompt is not None or args.dst or args.src:
            raise _UserError("give either --datapoints FILE or --prompt/--dst/--src, not both")
        return load_datapoints(args.datapoints)
    if args.prompt is None:
        raise _UserError("no datapoints: give --datapoints FILE.jsonl, or --prompt TEXT with --dst/--src completions")
    if not args.dst and not args.src:
        raise _UserError("--prompt needs at least one completion: --dst TEXT (promote) and/or --src TEXT (suppress)")
    return [TrainingDatapoint(args.prompt, src_completions=list(args.src or []), dst_completions=list(args.dst or []))]


def _apply_chat(datapoints: list[Any], tokenizer: Any) -> list[Any]:
    return [dataclasses.replace(dp, prompt=_chat(tokenizer, dp.prompt)) for dp in datapoints]


def _read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: one per line (.txt), or ``{"prompt": ...}`` per line (.jsonl)."""
    p = Path(path)
    if p.suffix != ".jsonl":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    from .jsonl import JSONLError, iter_jsonl

    prompts = []
    for number, obj in iter_jsonl(p):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise JSONLError('expected {"prompt": "..."}', str(p), number)
        prompts.append(obj["prompt"])
    return prompts


def _save_figure(draw: Callable[[], Any], path: Path, what: str) -> bool:
    """Write the Figure that ``draw()`` returns as a PNG, atomically; a warning, not an error, without matplotlib."""
    from .fsutil import atomic_write_file

    try:
        fig = draw()
    except ImportError as exc:
        logger.warning("%s; no %s", exc, what)
        return False
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return True


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local model folder or HF model id in the local cache "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32 (default for the embedded model), bfloat16, float16 or auto")


def _add_datapoint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("datapoints (a JSONL file, or one datapoint from flags)")
    g.add_argument("--datapoints", metavar="FILE", default=None,
                   help="JSONL file, one datapoint per line (schema: README, section JSONL files)")
    g.add_argument("--prompt", default=None, help="prompt of a single datapoint")
    g.add_argument("--dst", nargs="+", metavar="TEXT", default=None, help="completion(s) to promote")
    g.add_argument("--src", nargs="+", metavar="TEXT", default=None, help="completion(s) to suppress")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template (a user turn + generation prompt)")


# --------------------------------------------------------------------------------------- optimize


def _check_optimize_args(args: argparse.Namespace) -> None:
    if args.joint:
        bad = [_flag(f) for f in SINGLE_ONLY if getattr(args, f) not in (None, False)]
        if bad:
            raise _UserError(f"{', '.join(bad)} cannot be combined with --joint (one vector per layer)")
    else:
        bad = [_flag(f) for f in JOINT_ONLY if getattr(args, f)]
        if bad:
            raise _UserError(f"{', '.join(bad)} only apply with --joint")
    if args.do_output_constr and args.target_loss is None:
        raise _UserError("--output-constr needs --target-loss (the loss the norm-minimisation must keep)")
    _check_unique("--layer", args.layer)


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import optimize
    from .persist import describe_datapoints, save
    from .plots import plot_loss_curve

    options = _options(args)
    _check_optimize_args(args)
    _check_model_options(args)
    datapoints = _read_datapoints(args)
    _check_output(args.out, "save")
    model, tokenizer = _load_model(args)
    if args.chat:
        datapoints = _apply_chat(datapoints, tokenizer)
    layers = list(args.layer)
    result = optimize(model, tokenizer, datapoints, layers if args.joint or len(layers) > 1 else layers[0], options,
                      per_layer=args.joint, progress=_progress(args))
    extra = {k: v for k, v in result.extra.items()
             if k in ("output_constr_iters", "constraints_satisfied", "norm_before_output_constr")}
    vector = result.to_steering_vector(metadata=dict(
        method="optimize_vectors" if args.joint else "optimize_vector",
        hyperparameters={name: getattr(options, name) for name in args.option_fields},
        datapoints=describe_datapoints(datapoints), chat_template=bool(args.chat), final_loss=result.loss,
        model=_fingerprint(model, args), **extra))
    for key in ("loss", "options"):  # held by final_loss and hyperparameters, as in earlier releases
        vector.metadata.pop(key, None)
    out = save(vector, args.out)
    first = result.loss_history[0] if result.loss_history else result.loss
    article = "an" if vector.kind[0] in "aeiou" else "a"
    print(f"Optimised {article} {vector.kind} vector at layer(s) {layers}: {result.iters} steps, loss "
          f"{first:.4g} -> {result.loss:.4g} nats ({result.status}), norm(s) {{{_norms(vector)}}}")
    if extra:
        print(f"Then {extra['output_constr_iters']} norm-minimisation steps: norm "
              f"{extra['norm_before_output_constr']:.4g} -> {result.norm:.4g}, constraints "
              f"{'satisfied' if extra['constraints_satisfied'] else 'NOT satisfied'}")
    print(f"Saved to {out}")
    if not args.no_plot:
        p = Path(args.out)
        plot = Path(args.plot) if args.plot is not None else (
            p.with_name(p.stem + ".loss_curve.png") if p.suffix == ".safetensors" else p / "loss_curve.png")
        if _save_figure(lambda: plot_loss_curve(result.loss_history, target_loss=options.target_loss), plot,
                        "loss-curve PNG"):
            print(f"Loss curve: {plot}")
    return 0


def _add_optimize_parser(sub: Any) -> None:
    p = sub.add_parser("optimize", help="optimise a steering vector on datapoints and save it",
                       description="Optimise a steering vector by gradient descent and save it (folder or "
                                   ".safetensors) with a loss-curve PNG. Losses are in nats.")
    _add_model_options(p)
    _add_datapoint_options(p)
    p.add_argument("--layer", type=int, nargs="+", required=True,
                   help="layer(s) to steer (input of decoder block L); several layers share one vector "
                        "unless --joint")
    p.add_argument("--joint", action="store_true",
                   help="optimise one vector per --layer jointly (with the regularisation weights)")
    p.add_argument("--out", required=True, help="output folder (or FILE.safetensors)")
    p.add_argument("--plot", default=None, help="loss-curve PNG path (default: OUT/loss_curve.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the loss-curve PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.deferred.append(_add_option_flags)
    p.set_defaults(func=_cmd_optimize)


# ------------------------------------------------------------------------------------------ train


def _cmd_train(args: argparse.Namespace) -> int:
    from . import contrastive
    from .jsonl import load_contrast_pairs
    from .persist import describe_datapoints, save

    _check_model_options(args)
    pairs = load_contrast_pairs(args.pairs)
    _check_output(args.out, "save")
    model, tokenizer = _load_model(args)
    kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    vector = contrastive.contrastive_vector(
        model, tokenizer, pairs, args.layer, aggregator=getattr(contrastive, f"{args.aggregator}_aggregator")(),
        layer_type=args.site, read_token_index=args.read_token_index, show_progress=_progress(args), **kwargs)
    vector.metadata.update(
        hyperparameters={"aggregator": args.aggregator, "layers": args.layer, "layer_type": args.site,
                         "read_token_index": args.read_token_index, "batch_size": args.batch_size},
        datapoints=describe_datapoints(pairs),
        model=_fingerprint(model, args),
    )
    out = save(vector, args.out)
    print(f"Trained a {args.aggregator} vector from {len(pairs)} pairs at {vector.layer_type} layer(s) "
          f"{vector.layers}: norms {{{_norms(vector)}}}")
    print(f"Saved to {out}")
    return 0


def _add_site_option(p: argparse.ArgumentParser) -> None:
    from .arch import SITES

    p.add_argument("--site", choices=SITES, default="decoder_block", help="where to read/steer (decoder_block)")


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a contrastive (CAA/PCA/probe) vector from contrast pairs",
                       description="Train a steering vector from contrast pairs (JSONL: "
                                   '{"positive": ..., "negative": ...} per line) and save it.')
    _add_model_options(p)
    p.add_argument("--pairs", required=True, metavar="FILE", help="contrast pairs JSONL file")
    p.add_argument("--layer", type=int, nargs="+", default=None, help="layer(s) (default: every layer)")
    p.add_argument("--aggregator", choices=AGGREGATORS, default="mean", help="how to combine differences (mean)")
    p.add_argument("--read-token-index", type=int, default=-1, help="token whose activation is read (-1: last)")
    p.add_argument("--batch-size", type=_POS_INT, default=None, help="pairs per forward pass")
    p.add_argument("--out", required=True, help="output folder (or FILE.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.deferred.append(_add_site_option)
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------------------- generate


def _parse_vector_specs(specs: list[list[str]] | None) -> list[tuple[str, float]]:
    out = []
    for spec in specs or []:
        if len(spec) > 2:
            raise _UserError(f"--vector takes PATH [MULTIPLIER], got {len(spec)} values: {spec}")
        try:
            out.append((spec[0], _FLOAT(spec[1]) if len(spec) == 2 else 1.0))
        except argparse.ArgumentTypeError:
            raise _UserError(f"--vector {spec[0]}: multiplier must be a number, got {spec[1]!r}") from None
    return out


def _generate(model: Any, tokenizer: Any, text: str, args: argparse.Namespace) -> str:
    import torch

    enc = tokenizer(text, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .fsutil import atomic_write_file
    from .persist import check_compatible, load

    _check_model_options(args)
    prompts = list(args.prompt or []) + (_read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise _UserError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    specs = _parse_vector_specs(args.vector)
    if not specs and not args.compare:
        logger.info("no --vector given: generating unsteered text")
    loaded = []
    for path, mult in specs:  # read and verify every vector before loading the model
        obj = load(path)
        members = obj.items() if isinstance(obj, dict) else [(None, obj)]
        for name, vec in members:
            loaded.append((f"{path}" if name is None else f"{path} [{name}]", vec, mult))
    if args.output is not None:
        _check_output(args.output, "file")
    model, tokenizer = _load_model(args)
    for where, vec, _ in loaded:
        check_compatible(vec, model, allow_mismatch=args.allow_model_mismatch, source=where,
                         model_name=_model_label(args))
    results = []
    for prompt in tqdm(prompts, desc="generate", disable=not _progress(args)):
        text = _chat(tokenizer, prompt) if args.chat else prompt
        row: dict[str, Any] = {"prompt": prompt}
        if args.compare or not loaded:
            row["unsteered"] = _generate(model, tokenizer, text, args)
        if loaded:
            with contextlib.ExitStack() as stack:
                for _, vec, mult in loaded:
                    stack.enter_context(vec.apply(model, multiplier=mult))
                row["steered"] = _generate(model, tokenizer, text, args)
        results.append(row)
        print(f"=== prompt: {prompt}")
        if "unsteered" in row:
            print(f"unsteered: {row['unsteered']}")
        if "steered" in row:
            print(f"steered ({', '.join(f'{w} x{m:g}' for w, _, m in loaded)}): {row['steered']}")
    if args.output is not None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        atomic_write_file(args.output, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        print(f"Wrote {len(results)} results to {args.output}")
    return 0


def _add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text under one or more saved steering vectors",
                       description="Generate from prompt(s) with saved vectors applied (each with a multiplier). "
                                   "Vectors on the same layer are applied one after the other.")
    _add_model_options(p)
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help='prompts: one per line (.txt) or {"prompt": ...} per line (.jsonl)')
    p.add_argument("--vector", action="append", nargs="+", metavar=("PATH", "MULTIPLIER"), default=None,
                   help="saved vector (folder, .safetensors, set folder, .gguf) and an optional multiplier "
                        "(default 1); repeatable")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--compare", action="store_true", help="also generate without steering")
    p.add_argument("--max-new-tokens", type=_POS_INT, default=40, help="tokens to generate (40)")
    p.add_argument("--temperature", type=_NONNEG_FLOAT, default=0.0, help="sampling temperature; 0 = greedy (0)")
    p.add_argument("--top-p", type=_POS_FLOAT, default=1.0, help="nucleus sampling (1.0)")
    p.add_argument("--top-k", type=_NONNEG_INT, default=0, help="top-k sampling, 0 = off (0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="apply vectors made for another architecture/layer count (same hidden size)")
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="also write the results as JSONL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


# ------------------------------------------------------------------------------------------ sweep


#: sweep flags that are steering_opt.sweep.sweep() keywords (``dest``); their defaults are sweep()'s.
SWEEP_FLAGS: dict[str, dict[str, Any]] = {
    "--layers": dict(dest="layers", type=int, nargs="+", help="layers to try (None: chosen from the depth)"),
    "--strengths": dict(dest="multipliers", type=_FLOAT, nargs="+", help="multipliers to try"),
    "--max-norm": dict(dest="max_norms", type=_or_none(_POS_FLOAT), nargs="+",
                       help="norm caps, each one variant (none: no cap)"),
    "--clamp": dict(dest="clamps", type=_FLOAT, nargs="+", help="clamp coefficients, each one more variant"),
    "--scorer": dict(dest="scorer", help="success scorer spec, e.g. refusal or language:es (generates)"),
    "--criterion": dict(dest="criterion", choices=("auto", "margin", "fluent_success", "success"),
                        help="what the recommended row maximises (auto: fluent_success with --scorer, else margin)"),
    "--kl-weight": dict(dest="kl_weight", type=_NONNEG_FLOAT, help="weight of the neutral-prompt KL in 'margin'"),
    "--max-new-tokens": dict(dest="max_new_tokens", type=_POS_INT, help="tokens generated per validation prompt"),
    "--time-budget": dict(dest="time_budget_s", type=_POS_FLOAT, metavar="SECONDS",
                          help="start no new layer/variant once this much time would be exceeded"),
    "--seed": dict(dest="seed", type=_NONNEG_INT, help="seed of the train/validation split and the optimiser"),
}


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .fsutil import atomic_write_file
    from .persist import save
    from .plots import plot_sweep_heatmap
    from .sweep import sweep

    options = _options(args)
    _check_unique("--layers", args.layers)
    _check_model_options(args)
    datapoints = _read_datapoints(args)
    validation = _read_prompts_file(args.validation_prompts) if args.validation_prompts else None
    out = _check_output(args.out, "folder")
    model, tokenizer = _load_model(args)
    if args.chat:
        datapoints = _apply_chat(datapoints, tokenizer)
    settings = {f["dest"]: getattr(args, f["dest"]) for f in SWEEP_FLAGS.values()}
    optimize_kwargs = {name: getattr(options, name) for name in args.option_fields}
    result = sweep(model, tokenizer, datapoints, validation_prompts=validation, optimize_kwargs=optimize_kwargs,
                   progress=_progress(args), **settings)

    def clean(row: dict[str, Any]) -> dict[str, Any]:  # NaN/inf are not JSON
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}

    rows = [clean(r) for r in result.table]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_file(out / "sweep.csv", lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))
    doc = {"criterion": result.criterion, "best": clean(result.best or {}), "rows": rows, "notes": result.notes,
           "baseline": result.baseline, "validation_prompts": result.validation_prompts, "chat": result.chat,
           "time_s": result.time_s, "model": _model_label(args), "settings": {
               **settings, "optimize": optimize_kwargs, "chat_template": args.chat, "datapoints": len(datapoints)}}
    atomic_write_file(out / "sweep.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8"))
    fingerprint = _fingerprint(model, args)
    saves = {"best": result.best_steering()}
    if args.save_vectors:
        saves.update({f"vectors/layer_{layer}" + ("" if variant == "additive" else "_" + variant.replace("=", "")):
                      vec for (layer, variant), vec in result.vectors.items()})
    for name, vec in saves.items():
        vec.metadata["model"] = fingerprint
        save(vec, out / name)
    print(result.to_markdown())
    for note in result.notes:
        print(f"Note: {note}")
    b = result.best
    print(f"Best by {result.criterion} (higher is better): layer {b['layer']}, {b['variant']}, strength "
          f"{b['multiplier']:g} ({result.criterion} = {b['criterion']:.4g})")
    print(f"Recommended steering, already scaled: {out / 'best'} (steering-opt generate --vector {out / 'best'})")
    print(f"Wrote {out / 'sweep.csv'} and {out / 'sweep.json'}")
    if _save_figure(lambda: plot_sweep_heatmap(result), out / "sweep_heatmap.png", "heatmap"):
        print(f"Heatmap: {out / 'sweep_heatmap.png'}")
    return 0


def _add_sweep_library_flags(p: argparse.ArgumentParser) -> None:
    """SWEEP_FLAGS with sweep()'s defaults, and the optimiser's flags with the sweep's optimiser defaults."""
    from .sweep import DEFAULT_OPTIMIZE_KWARGS, sweep

    defaults = {k: v.default for k, v in inspect.signature(sweep).parameters.items()}
    for flag, kwargs in SWEEP_FLAGS.items():
        p.add_argument(flag, **{**kwargs, "default": defaults[kwargs["dest"]],
                                "help": kwargs["help"] + " (default: %(default)s)"})
    _add_option_flags(p, exclude=SWEEP_MANAGED, defaults=DEFAULT_OPTIMIZE_KWARGS)


def _add_sweep_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="measure steering over layers x strengths (x norm caps / clamps)",
                       description="steering_opt.sweep: for each layer (and variant) optimise a vector on the "
                                   "datapoints, measure it at each strength on validation prompts (held-out "
                                   "datapoints, --validation-prompts or built-in ones) and rank the rows by "
                                   "--criterion. Writes sweep.csv, sweep.json, sweep_heatmap.png and the "
                                   "recommended vector (OUT/best).")
    _add_model_options(p)
    _add_datapoint_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--validation-prompts", metavar="FILE", default=None,
                   help='validation prompts: one per line (.txt) or {"prompt": ...} per line (.jsonl)')
    p.add_argument("--save-vectors", action="store_true", help="also save every vector under OUT/vectors/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.deferred.append(_add_sweep_library_flags)
    p.set_defaults(func=_cmd_sweep)


# ----------------------------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from .persist import export_gguf, export_tensors, load_vector

    out = Path(args.out)
    fmt = args.format or out.suffix.lower().lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise _UserError(f"cannot tell the export format from {str(out)!r}; pass --format "
                         f"{{{','.join(EXPORT_FORMATS)}}} or use one of those suffixes")
    if out.suffix.lower() != f".{fmt}":
        raise _UserError(f"--out {str(out)!r} should end in '.{fmt}' for --format {fmt}")
    vector = load_vector(args.vector)
    if fmt == "gguf":
        export_gguf(vector, out, multiplier=args.multiplier, model_hint=args.model_hint)
        shown = ", ".join(f"{layer} -> direction.{layer - 1}" for layer in vector.layers)
        print(f"Exported {len(vector.layers)} layer(s) to {out} (llama.cpp numbering: {shown}); use it with "
              f"llama-cli --control-vector {out}")
    else:
        export_tensors(vector, out, multiplier=args.multiplier)
        print(f"Exported layer(s) {vector.layers} to {out}")
    return 0


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a saved vector to GGUF (llama.cpp) or .pt/.npy/.npz",
                       description="Export a saved additive decoder_block vector. GGUF: llama.cpp control vector "
                                   "(our layer L becomes direction.{L-1}; layers 0 and 1 cannot be exported).")
    p.add_argument("vector", help="saved vector (folder or .safetensors)")
    p.add_argument("--out", required=True, help="output file (.gguf, .pt, .npy or .npz)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=None, help="default: from the --out suffix")
    p.add_argument("--multiplier", type=_FLOAT, default=1.0, help="scale baked into the export (1)")
    p.add_argument("--model-hint", default=None, help="GGUF controlvector.model_hint (default: the model type)")
    p.set_defaults(func=_cmd_export)


# ------------------------------------------------------------------------------------------- info


def _cmd_info(args: argparse.Namespace) -> int:
    from .persist import describe, load, read_metadata

    obj = load(args.path)  # full verification: checksum, shapes, dtypes, finiteness
    if args.json:
        path = Path(args.path)
        if isinstance(obj, dict) or path.is_dir() or path.suffix == ".safetensors":
            doc: Any = read_metadata(path)
            if isinstance(obj, dict):
                doc = {"set": doc, "vectors": {name: v.metadata for name, v in obj.items()}}
        else:
            doc = obj.metadata
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    members = obj.items() if isinstance(obj, dict) else [(None, obj)]
    print(f"{args.path}: a set of {len(obj)} named vectors" if isinstance(obj, dict) else
          f"{args.path}: steering vector")
    for name, vec in members:
        if name is not None:
            print(f"[{name}]")
        print("\n".join(describe(vec, "  ")))
    return 0


def _add_info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="print a saved vector's metadata (after verifying it)")
    p.add_argument("path", help="saved vector or set (folder, .safetensors, .gguf, legacy .json/.pt)")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(func=_cmd_info)


# ------------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    dtype = _check_model_options(args)  # fail fast, before importing or loading anything
    from .demo import run_demo

    run_demo(args.model, device=args.device, dtype=dtype, max_new_tokens=args.max_new_tokens, layer=args.layer,
             max_iters=args.max_iters)
    return 0


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the demo on the embedded model")
    _add_model_options(p)
    p.add_argument("--max-new-tokens", type=_POS_INT, default=40, help="tokens to generate per completion (40)")
    p.add_argument("--layer", type=int, default=6, help="layer to steer (default: 6)")
    p.add_argument("--max-iters", type=_POS_INT, default=30, help="optimiser steps (default: 30)")
    p.set_defaults(func=_cmd_demo)


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = _Parser(prog="steering-opt", description="Find and apply steering vectors for HF causal LMs.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_optimize_parser, _add_train_parser, _add_generate_parser, _add_sweep_parser,
                _add_export_parser, _add_info_parser, _add_demo_parser):
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


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
    except BrokenPipeError:  # e.g. `steering-opt info ... | head`: stop quietly, as other tools do
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (_UserError, ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        print(f"steering-opt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
