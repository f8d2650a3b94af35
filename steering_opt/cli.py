"""The ``steering-opt`` command line, a thin layer over the library.

``optimize`` (:func:`steering_opt.optimize.optimize`, one flag per :class:`~steering_opt.options.OptimizeOptions`
field), ``train`` (contrastive vectors), ``generate``, ``evaluate`` (:func:`steering_opt.evaluate.evaluate`),
``sweep`` (:func:`steering_opt.sweep.sweep`), ``auto-steer`` (:func:`steering_opt.sweep.auto_steer`), ``export``
(GGUF, .pt/.npy/.npz), ``info`` and ``demo``; the measuring commands live in :mod:`steering_opt.cli_commands`.
User errors (bad option values, a missing or malformed file, an unavailable model, an unknown layer) print one
line to stderr and exit with status 2; no traceback; a mistyped option or subcommand gets a suggestion. The
library is imported inside the commands, and flags that need it are added only when their subcommand is parsed,
so ``steering-opt --help`` imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_args import (
    FLOAT,
    NONNEG_INT,
    POS_FLOAT,
    POS_INT,
    SEED,
    TEMPERATURE,
    Parser,
    UserError,
    add_datapoint_options,
    add_model_options,
    add_option_flags,
    add_vector_option,
    apply_chat,
    chat_prompt,
    check_model_options,
    check_output,
    check_unique,
    option_flag,
    options_from_args,
    read_datapoints,
    read_prompts_file,
    read_vectors,
    shorten,
)
from .cli_commands import (
    add_auto_steer_parser,
    add_evaluate_parser,
    add_sweep_parser,
    announce_loading,
    check_vectors,
    fingerprint,
    load_model_for,
    model_label,
    norms_text,
    progress_enabled,
    save_figure,
    write_text,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
AGGREGATORS = ("mean", "pca", "logistic")
EXPORT_FORMATS = ("gguf", "pt", "npy", "npz")
#: ``optimize --joint`` (one plain vector per layer) refuses the first fields and needs it for the second.
SINGLE_ONLY = ("vector_clamp", "affine_rank", "noise_scale", "do_output_constr")
JOINT_ONLY = ("regularization_weight", "sparsity_weight", "entropy_weight")


# --------------------------------------------------------------------------------------- optimize


def _check_optimize_args(args: argparse.Namespace) -> None:
    if args.joint:
        bad = [option_flag(f) for f in SINGLE_ONLY if getattr(args, f) not in (None, False)]
        if bad:
            raise UserError(f"{', '.join(bad)} cannot be combined with --joint (one vector per layer)")
    else:
        bad = [option_flag(f) for f in JOINT_ONLY if getattr(args, f)]
        if bad:
            raise UserError(f"{', '.join(bad)} only apply with --joint")
    if args.do_output_constr and args.target_loss is None:
        raise UserError("--output-constr needs --target-loss (the loss the norm-minimisation must keep)")
    check_unique("--layer", args.layer)


class RecipeSteps:
    """The default of ``optimize --max-iters``: the documented recipe's step count, or with ``--target-loss``
    none (run until the target is reached, at most ``DEFAULT_MAX_ITERS`` steps)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __str__(self) -> str:
        from .options import DEFAULT_MAX_ITERS

        return f"{self.steps}; with --target-loss: until it is reached, at most {DEFAULT_MAX_ITERS}"

    def resolve(self, target_loss: float | None) -> int | None:
        return self.steps if target_loss is None else None


def _budget(options: Any) -> str:
    """The step budget of an optimisation, in words."""
    if options.max_iters is not None:
        steps = f"{options.max_iters} steps"
        if options.plateau_patience is not None:
            steps = f"at most {options.max_iters} steps (fewer if the loss plateaus)"
    elif options.target_loss is not None:
        steps = f"until the loss is <= {options.target_loss:g} nats, at most {options.step_cap} steps"
    else:
        steps = f"until the loss stops changing, at most {options.step_cap} steps"
    return f"{steps} of Adam at lr {options.lr:g} (--max-iters / --lr to change)"


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import optimize
    from .persist import describe_datapoints, save
    from .plots import plot_loss_curve

    if isinstance(args.max_iters, RecipeSteps):
        args.max_iters = args.max_iters.resolve(args.target_loss)
    # Ctrl-C during the optimisation stops it and saves the best vector so far (status "interrupted")
    options = dataclasses.replace(options_from_args(args), return_on_interrupt=True)
    _check_optimize_args(args)
    check_model_options(args)
    datapoints = read_datapoints(args)
    check_output(args.out, "save")
    model, tokenizer = load_model_for(args)
    described = describe_datapoints(datapoints)  # as given, before any chat template
    if args.chat:
        datapoints = apply_chat(datapoints, tokenizer)
    layers = list(args.layer)
    print(f"Optimising on {len(datapoints)} datapoint(s) at layer(s) {layers}: {_budget(options)}", flush=True)
    result = optimize(model, tokenizer, datapoints, layers if args.joint or len(layers) > 1 else layers[0], options,
                      per_layer=args.joint, progress=progress_enabled(args))
    extra = {k: v for k, v in result.extra.items()
             if k in ("output_constr_iters", "constraints_satisfied", "norm_before_output_constr")}
    vector = result.to_steering_vector(metadata=dict(
        method="optimize_vectors" if args.joint else "optimize_vector",
        hyperparameters={name: getattr(options, name) for name in args.option_fields},
        datapoints=described, chat_template=bool(args.chat), final_loss=result.loss,
        model=fingerprint(model, args), **extra))
    out = save(vector, args.out)
    first = result.loss_history[0] if result.loss_history else result.loss
    article = "an" if vector.kind[0] in "aeiou" else "a"
    print(f"Optimised {article} {vector.kind} vector at layer(s) {layers}: {result.iters} steps, loss "
          f"{first:.4g} -> {result.loss:.4g} nats ({result.status}), norm(s) {{{norms_text(vector)}}}")
    if extra:
        print(f"Then {extra['output_constr_iters']} norm-minimisation steps: norm "
              f"{extra['norm_before_output_constr']:.4g} -> {result.norm:.4g}, constraints "
              f"{'satisfied' if extra['constraints_satisfied'] else 'NOT satisfied'}")
    print(f"Saved to {out}")
    if not args.no_plot:
        p = Path(args.out)
        plot = Path(args.plot) if args.plot is not None else (
            p.with_name(p.stem + ".loss_curve.png") if p.suffix == ".safetensors" else p / "loss_curve.png")
        if save_figure(lambda: plot_loss_curve(result.loss_history, target_loss=options.target_loss), plot,
                        "loss-curve PNG"):
            print(f"Loss curve: {plot}")
    return 0


def _add_optimize_parser(root: Parser, sub: Any) -> None:
    p = root.add_command(sub, "optimize", help="optimise a steering vector on datapoints and save it",
                         description="Optimise a steering vector by gradient descent and save it (folder or "
                                     ".safetensors) with a loss-curve PNG. Losses are in nats. Default: "
                                     "the documented recipe, 30 Adam steps at lr 0.1.")
    add_model_options(p)
    add_datapoint_options(p)
    p.add_argument("--layer", type=int, nargs="+", required=True,
                   help="layer(s) to steer (input of decoder block L); several layers share one vector "
                        "unless --joint")
    p.add_argument("--joint", action="store_true",
                   help="optimise one vector per --layer jointly (with the regularisation weights)")
    p.add_argument("--out", required=True, help="output folder (or FILE.safetensors)")
    p.add_argument("--plot", default=None, help="loss-curve PNG path (default: OUT/loss_curve.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the loss-curve PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.deferred.append(_add_optimize_option_flags)
    p.set_defaults(func=_cmd_optimize)


def _add_optimize_option_flags(p: argparse.ArgumentParser) -> None:
    """The optimiser's flags, with the documented recipe's lr and step count as defaults."""
    from .sweep import DEFAULT_OPTIMIZE_KWARGS

    add_option_flags(p, defaults={**DEFAULT_OPTIMIZE_KWARGS, "max_iters": RecipeSteps(
        DEFAULT_OPTIMIZE_KWARGS["max_iters"])})


# ------------------------------------------------------------------------------------------ train


def _cmd_train(args: argparse.Namespace) -> int:
    from . import contrastive
    from .jsonl import load_contrast_pairs
    from .persist import describe_datapoints, save

    check_model_options(args)
    pairs = load_contrast_pairs(args.pairs)
    check_output(args.out, "save")
    model, tokenizer = load_model_for(args)
    kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    vector = contrastive.contrastive_vector(
        model, tokenizer, pairs, args.layer, aggregator=getattr(contrastive, f"{args.aggregator}_aggregator")(),
        layer_type=args.site, read_token_index=args.read_token_index, show_progress=progress_enabled(args), **kwargs)
    vector.metadata.update(
        hyperparameters={"aggregator": args.aggregator, "layers": args.layer, "layer_type": args.site,
                         "read_token_index": args.read_token_index, "batch_size": args.batch_size},
        datapoints=describe_datapoints(pairs),
        model=fingerprint(model, args),
    )
    out = save(vector, args.out)
    print(f"Trained a {args.aggregator} vector from {len(pairs)} pairs at {vector.layer_type} layer(s) "
          f"{vector.layers}: norms {{{norms_text(vector)}}}")
    print(f"Saved to {out}")
    return 0


def _add_site_option(p: argparse.ArgumentParser) -> None:
    from .arch import SITES

    p.add_argument("--site", choices=SITES, default="decoder_block", help="where to read/steer (decoder_block)")


def _add_train_parser(root: Parser, sub: Any) -> None:
    p = root.add_command(sub, "train", help="train a contrastive (CAA/PCA/probe) vector from contrast pairs",
                         description="Train a steering vector from contrast pairs (JSONL: "
                                     '{"positive": ..., "negative": ...} per line) and save it.')
    add_model_options(p)
    p.add_argument("--pairs", required=True, metavar="FILE", help="contrast pairs JSONL file")
    p.add_argument("--layer", type=int, nargs="+", default=None, help="layer(s) (default: every layer)")
    p.add_argument("--aggregator", choices=AGGREGATORS, default="mean", help="how to combine differences (mean)")
    p.add_argument("--read-token-index", type=int, default=-1, help="token whose activation is read (-1: last)")
    p.add_argument("--batch-size", type=POS_INT, default=None, help="pairs per forward pass")
    p.add_argument("--out", required=True, help="output folder (or FILE.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.deferred.append(_add_site_option)
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------------------- generate


def _generate(model: Any, tokenizer: Any, text: str, args: argparse.Namespace) -> str:
    import torch

    from .arch import check_context_length, context_length
    from .data import check_chars_fit

    n_ctx = context_length(model)
    check_chars_fit(tokenizer, len(text), n_ctx, "the prompt")  # before tokenising a text that cannot fit
    enc = tokenizer(text, return_tensors="pt")
    check_context_length(model, int(enc["input_ids"].shape[1]), "the prompt")
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

    check_model_options(args)
    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    loaded = read_vectors(args.vector)  # read and verify every vector before loading the model
    if not loaded and not args.compare:
        logger.info("no --vector given: generating unsteered text")
    if args.output is not None:
        check_output(args.output, "file")
    model, tokenizer = load_model_for(args)
    check_vectors(loaded, model, args)
    # what produced each line of --output: the vectors (as given, with their multipliers) and the settings
    steering = [{"vector": where, "multiplier": mult, "method": vec.metadata.get("method")}
                for where, vec, mult in loaded]
    settings = {"model": model_label(args), "chat": bool(args.chat), "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    results = []
    for prompt in tqdm(prompts, desc="generate", disable=not progress_enabled(args)):
        text = chat_prompt(tokenizer, prompt) if args.chat else prompt
        row: dict[str, Any] = {"prompt": prompt}
        if args.compare or not loaded:
            row["unsteered"] = _generate(model, tokenizer, text, args)
        if loaded:
            with contextlib.ExitStack() as stack:
                for _, vec, mult in loaded:
                    stack.enter_context(vec.apply(model, multiplier=mult))
                row["steered"] = _generate(model, tokenizer, text, args)
        results.append({**row, "steering": steering, "settings": settings})
        print(f"=== prompt: {prompt}")
        if "unsteered" in row:
            print(f"unsteered: {row['unsteered']}")
        if "steered" in row:
            print(f"steered ({', '.join(f'{w} x{m:g}' for w, _, m in loaded)}): {row['steered']}")
    if args.output is not None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        write_text(args.output, lines)
        print(f"Wrote {len(results)} results to {args.output}")
    return 0


def _add_generate_parser(root: Parser, sub: Any) -> None:
    p = root.add_command(sub, "generate", help="generate text under one or more saved steering vectors",
                         description="Generate from prompt(s) with saved vectors applied (each with a "
                                     "multiplier). Vectors on the same layer are applied one after the other. "
                                     "--output records, for each prompt, the texts, the vectors and multipliers "
                                     "that produced them and the generation settings.")
    add_model_options(p)
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help='prompts: one per line (.txt) or {"prompt": ...} per line (.jsonl)')
    add_vector_option(p)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--compare", action="store_true", help="also generate without steering")
    p.add_argument("--max-new-tokens", type=POS_INT, default=40, help="tokens to generate (40)")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.0,
                   help="sampling temperature: 0 = greedy, else at least 1e-4 (0)")
    p.add_argument("--top-p", type=POS_FLOAT, default=1.0, help="nucleus sampling (1.0)")
    p.add_argument("--top-k", type=NONNEG_INT, default=0, help="top-k sampling, 0 = off (0)")
    p.add_argument("--seed", type=SEED, default=None, help="random seed for sampling (0 .. 2**63-1)")
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="also write the results as JSONL (with the vectors and settings of each line)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


# ----------------------------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from .persist import export_gguf, export_tensors, load_vector

    out = Path(args.out)
    fmt = args.format or out.suffix.lower().lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"cannot tell the export format from {str(out)!r}; pass --format "
                         f"{{{','.join(EXPORT_FORMATS)}}} or use one of those suffixes")
    if out.suffix.lower() != f".{fmt}":
        raise UserError(f"--out {str(out)!r} should end in '.{fmt}' for --format {fmt}")
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


def _add_export_parser(root: Parser, sub: Any) -> None:
    p = root.add_command(sub, "export", help="export a saved vector to GGUF (llama.cpp) or .pt/.npy/.npz",
                         description="Export a saved additive decoder_block vector. GGUF: llama.cpp control vector "
                                     "(our layer L becomes direction.{L-1}; layers 0 and 1 cannot be exported; "
                                     "the model fingerprint is recorded, so loading it for another model is "
                                     "refused).")
    p.add_argument("vector", help="saved vector (folder or .safetensors)")
    p.add_argument("--out", required=True, help="output file (.gguf, .pt, .npy or .npz)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=None, help="default: from the --out suffix")
    p.add_argument("--multiplier", type=FLOAT, default=1.0, help="scale baked into the export (1)")
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


def _add_info_parser(root: Parser, sub: Any) -> None:
    p = root.add_command(sub, "info", help="print a saved vector's metadata (after verifying it)",
                         description="Verify a saved vector or set (checksum, shapes, finite values) and print "
                                     "what it is (kind, site, layers, norms) and how it was made (model, method, "
                                     "options, datapoints, final loss, the vector it was derived from, library "
                                     "version).")
    p.add_argument("path", help="saved vector or set (folder, .safetensors, .gguf, legacy .json/.pt)")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(func=_cmd_info)


# ------------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    dtype = check_model_options(args)  # fail fast, before importing or loading anything
    from .demo import run_demo

    announce_loading(args)
    run_demo(args.model, device=args.device, dtype=dtype, max_new_tokens=args.max_new_tokens, layer=args.layer,
             max_iters=args.max_iters)
    return 0


def _add_demo_parser(root: Parser, sub: Any) -> None:
    p = root.add_command(sub, "demo", help="run the demo on the embedded model",
                         description="The one-minute demo: optimise a refusal vector from one datapoint on the "
                                     "embedded SmolLM2-135M-Instruct (or --model) and print steered and unsteered "
                                     "answers to the training prompt and to prompts never seen in training.")
    add_model_options(p)
    p.add_argument("--max-new-tokens", type=POS_INT, default=40, help="tokens to generate per completion (40)")
    p.add_argument("--layer", type=int, default=6, help="layer to steer (default: 6)")
    p.add_argument("--max-iters", type=POS_INT, default=30, help="optimiser steps (default: 30)")
    p.set_defaults(func=_cmd_demo)


# ------------------------------------------------------------------------------------------- main


def build_parser() -> Parser:
    """The argument parser with all subcommands."""
    from . import __version__

    parser = Parser(prog="steering-opt", description="Find and apply steering vectors for HF causal LMs.",
                    epilog="Start with: steering-opt demo; then steering-opt auto-steer --prompt TEXT --dst TEXT "
                           "--out VECTOR and steering-opt generate --vector VECTOR --prompt TEXT. "
                           "COMMAND --help lists a command's options.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: info, -vv: debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in (_add_optimize_parser, _add_train_parser, _add_generate_parser, add_evaluate_parser,
                add_sweep_parser, add_auto_steer_parser, _add_export_parser, _add_info_parser, _add_demo_parser):
        add(parser, sub)
    return parser


#: Longest error line the command line prints (longer messages are cut in the middle).
MAX_ERROR_CHARS = 1000


def _one_line(exc: BaseException, *, with_type: bool = False) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    if with_type and not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return shorten(text, MAX_ERROR_CHARS)


def main(argv: list[str] | None = None) -> int:
    """Run the ``steering-opt`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as exc:
        print(_one_line(exc), file=sys.stderr)
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
    except (UserError, ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        print(f"steering-opt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else (a torch RuntimeError, MemoryError, ...): still one line
        logger.debug("traceback of the error below", exc_info=True)
        print(f"steering-opt {args.command}: error: {_one_line(exc, with_type=True)} (-vv shows the traceback)",
              file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
