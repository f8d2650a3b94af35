"""The ``steering-opt`` command line.

Subcommands: ``optimize`` (gradient-descent steering from datapoints), ``train`` (contrastive vectors from
pairs), ``generate`` (text under saved vectors), ``sweep`` (layers x strengths table and heatmap),
``export`` (GGUF for llama.cpp, .pt/.npy/.npz), ``info`` (a saved vector's metadata) and ``demo``.

User errors (bad option values, a missing or malformed file, a model that is not available, an unknown
layer) print one line to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)


class _UserError(Exception):
    """An error caused by the command line's input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) and exit with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UserError(f"{self.prog}: {message} (see --help)")


# ------------------------------------------------------------------------------------ argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
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


# ------------------------------------------------------------------------------------ shared helpers


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from .models import load_model, parse_dtype

    dtype = parse_dtype(args.dtype)
    _check_device(args.device)
    return load_model(args.model, device=args.device, dtype=dtype)


def _check_model_options(args: argparse.Namespace) -> None:
    """Fail fast on a bad --dtype/--device, before reading data or loading anything."""
    from .models import parse_dtype

    parse_dtype(args.dtype)
    _check_device(args.device)


def _model_label(args: argparse.Namespace) -> str:
    from .models import EMBEDDED_MODEL_NAME

    return args.model or EMBEDDED_MODEL_NAME


def _fingerprint(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from .arch import model_fingerprint

    fp = model_fingerprint(model)
    fp["name_or_path"] = _model_label(args)
    return fp


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _chat(tokenizer: Any, text: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template")
    from .demo import chat_prompt

    return chat_prompt(tokenizer, text)


def _check_out(path: str) -> None:
    """Fail before any expensive work if ``--out`` cannot be written."""
    from .persist import check_save_target

    check_save_target(Path(path))


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
    try:
        return [TrainingDatapoint(args.prompt, src_completions=list(args.src or []),
                                  dst_completions=list(args.dst or []))]
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _apply_chat(datapoints: list[Any], tokenizer: Any) -> list[Any]:
    import dataclasses

    return [dataclasses.replace(dp, prompt=_chat(tokenizer, dp.prompt)) for dp in datapoints]


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


def _write_png(fig: Any, path: Path) -> None:
    from .persist import atomic_write_file

    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _save_loss_curve(info: dict[str, Any], path: Path, target_loss: float | None = None) -> bool:
    """Write the loss-curve PNG (``plots.plot_loss_curve``); a warning, not an error, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'steering-opt[plot]'); no loss-curve PNG")
        return False
    try:
        from .plots import plot_loss_curve
    except ImportError:  # plots.py not available in this installation: a plain curve
        fig, ax = plt.subplots(figsize=(6, 3.5))
        hist = info.get("loss_history") or []
        ax.plot(range(len(hist)), hist, marker="." if len(hist) < 50 else None)
        ax.set_xlabel("evaluation (optimiser step)")
        ax.set_ylabel("loss (nats)")
        if target_loss is not None:
            ax.axhline(target_loss, linestyle="--", color="gray")
        ax.set_title("optimisation loss")
        ax.grid(alpha=0.3)
    else:
        result = plot_loss_curve(info, target_loss=target_loss)
        fig = result[0] if isinstance(result, tuple) else getattr(result, "figure", result)
    try:
        _write_png(fig, path)
    finally:
        plt.close(fig)
    return True


def _plot_path(out: str, plot: str | None) -> Path:
    if plot is not None:
        return Path(plot)
    p = Path(out)
    return p.with_name(p.stem + ".loss_curve.png") if p.suffix == ".safetensors" else p / "loss_curve.png"


def _total_loss(info: dict[str, Any]) -> float:
    loss = info.get("loss")
    if isinstance(loss, (int, float)):
        return float(loss)
    nested = info.get("completion_losses") or loss or []
    return float(sum(x for dp in nested for kind in dp for x in kind))


# ------------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .models import parse_dtype

    dtype = parse_dtype(args.dtype)  # fail fast on a bad --dtype/--device, before loading anything
    _check_device(args.device)
    run_demo(args.model, device=args.device, dtype=dtype, max_new_tokens=args.max_new_tokens, layer=args.layer,
             max_iters=args.max_iters)
    return 0


# --------------------------------------------------------------------------------------- optimize


def _optimize_hparams(args: argparse.Namespace) -> dict[str, Any]:
    common = dict(lr=args.lr, max_iters=args.max_iters, coldness=args.coldness,
                  normalize_token_length=args.normalize_token_length, only_hook_prompt=args.only_hook_prompt,
                  target_loss=args.target_loss, do_target_loss_sum=not args.per_completion_target,
                  target_loss_target_iters=args.target_loss_target_iters, do_one_minus=not args.no_one_minus,
                  max_norm=args.max_norm, starting_norm=args.starting_norm, seed=args.seed, engine=args.engine,
                  max_batch_tokens=args.max_batch_tokens)
    if args.joint:
        common.update(regularization_weight=args.regularization_weight,
                      regularization_type=args.regularization_type, sparsity_weight=args.sparsity_weight,
                      entropy_weight=args.entropy_weight)
    else:
        common.update(vector_clamp=args.vector_clamp, affine_rank=args.affine_rank,
                      max_affine_norm=args.max_affine_norm, starting_affine_norm=args.starting_affine_norm,
                      noise_scale=args.noise_scale, do_tangent_space_noise=not args.no_tangent_noise,
                      do_output_constr=args.output_constr, output_constr_lr=args.output_constr_lr,
                      max_output_constr_iters=args.max_output_constr_iters)
    return common


def _check_optimize_args(args: argparse.Namespace) -> None:
    if args.joint:
        single_only = {"--vector-clamp": args.vector_clamp, "--affine-rank": args.affine_rank,
                       "--noise-scale": args.noise_scale, "--output-constr": args.output_constr or None}
        bad = [k for k, v in single_only.items() if v is not None]
        if bad:
            raise _UserError(f"{', '.join(bad)} cannot be combined with --joint (one vector per layer)")
    else:
        joint_only = {"--regularization-weight": args.regularization_weight, "--sparsity-weight": args.sparsity_weight,
                      "--entropy-weight": args.entropy_weight}
        bad = [k for k, v in joint_only.items() if v]
        if bad:
            raise _UserError(f"{', '.join(bad)} only apply with --joint")
    if args.vector_clamp is not None and args.affine_rank is not None:
        raise _UserError("--vector-clamp and --affine-rank cannot be combined")
    if args.output_constr and args.target_loss is None:
        raise _UserError("--output-constr needs --target-loss (the loss the norm-minimisation must keep)")
    if len(set(args.layer)) != len(args.layer):
        raise _UserError(f"--layer lists a layer twice: {args.layer}")


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import optimize_vector, optimize_vectors
    from .persist import describe_datapoints, save
    from .vector import SteeringVector

    _check_optimize_args(args)
    _check_model_options(args)
    datapoints = _read_datapoints(args)
    _check_out(args.out)
    model, tokenizer = _load_model(args)
    if args.chat:
        datapoints = _apply_chat(datapoints, tokenizer)
    hp = _optimize_hparams(args)
    layers = list(args.layer)
    progress = _progress(args)
    if args.joint:
        vectors, info = optimize_vectors(model, datapoints, layers, tokenizer=tokenizer, progress=progress, **hp)
        vector = SteeringVector.from_optimization(vectors, info)
    else:
        result = optimize_vector(model, datapoints, layers if len(layers) > 1 else layers[0], tokenizer=tokenizer,
                                 progress=progress, **hp)
        vec, info = result[0], result[-1]
        vector = SteeringVector.from_optimization(vec, info, layers, clamp=args.vector_clamp)
    final = _total_loss(info)
    vector.metadata.update(
        method="optimize_vectors" if args.joint else "optimize_vector",
        hyperparameters=hp,
        datapoints=describe_datapoints(datapoints),
        chat_template=bool(args.chat),
        iters=info.get("iters"),
        status=info.get("status"),
        final_loss=final,
        loss_units="nats",
        model=_fingerprint(model, args),
    )
    vector.metadata.pop("loss", None)  # a per-completion nested list with --per-completion-target
    for key in ("output_constr_iters", "constraints_satisfied", "norm_before_output_constr"):
        if key in info:
            vector.metadata[key] = info[key]
    out = save(vector, args.out)
    hist = info.get("loss_history") or [final]
    norms = ", ".join(f"{k}: {float(v.norm()):.3g}" for k, v in sorted(vector.layer_activations.items()))
    article = "an" if vector.kind[0] in "aeiou" else "a"
    print(f"Optimised {article} {vector.kind} vector at layer(s) {layers}: {info.get('iters')} steps, loss "
          f"{hist[0]:.4g} -> {final:.4g} nats ({info.get('status')}), norm(s) {{{norms}}}")
    if "output_constr_iters" in info:
        print(f"Then {info['output_constr_iters']} norm-minimisation steps: norm "
              f"{info['norm_before_output_constr']:.4g} -> {info['norm']:.4g}, constraints "
              f"{'satisfied' if info.get('constraints_satisfied') else 'NOT satisfied'}")
    print(f"Saved to {out}")
    if not args.no_plot:
        plot = _plot_path(args.out, args.plot)
        if _save_loss_curve(info, plot, args.target_loss):
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
    p.add_argument("--out", required=True, help="output folder (or FILE.safetensors)")
    p.add_argument("--plot", default=None, help="loss-curve PNG path (default: OUT/loss_curve.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the loss-curve PNG")
    o = p.add_argument_group("optimiser")
    o.add_argument("--lr", type=_positive_float, default=0.01, help="Adam learning rate (default: 0.01)")
    o.add_argument("--max-iters", type=_nonneg_int, default=None,
                   help="optimiser steps (default: until --target-loss or convergence, at most 1000)")
    o.add_argument("--target-loss", type=_float, default=None, help="stop when the loss (nats) is <= this")
    o.add_argument("--target-loss-target-iters", type=_positive_int, default=1,
                   help="consecutive evaluations at target before stopping (default: 1)")
    o.add_argument("--per-completion-target", action="store_true",
                   help="every completion must reach the target (do_target_loss_sum=False)")
    o.add_argument("--coldness", type=_positive_float, default=0.7, help="inverse temperature of the loss (0.7)")
    o.add_argument("--normalize-token-length", action="store_true", help="divide each loss by its token count")
    o.add_argument("--only-hook-prompt", action="store_true", help="steer prompt positions only")
    o.add_argument("--no-one-minus", action="store_true",
                   help="suppression loss +sum log p instead of -sum log(1-p) (do_one_minus=False)")
    o.add_argument("--max-norm", type=_positive_float, default=None, help="cap on the vector norm")
    o.add_argument("--starting-norm", type=_positive_float, default=1.0, help="norm of the random start (1)")
    o.add_argument("--seed", type=int, default=None, help="random seed (initial vector, noise)")
    o.add_argument("--engine", choices=("fast", "reference"), default="fast", help="loss engine (fast)")
    o.add_argument("--max-batch-tokens", type=_positive_int, default=16384, help="memory bound of one chunk")
    k = p.add_argument_group("kind of steering (single vector)")
    k.add_argument("--vector-clamp", type=_float, default=None, help="clamp steering with this coefficient")
    k.add_argument("--affine-rank", type=_positive_int, default=None, help="learn a rank-r affine map too")
    k.add_argument("--max-affine-norm", type=_positive_float, default=2.0, help="row-norm cap of the factors (2)")
    k.add_argument("--starting-affine-norm", type=_positive_float, default=1.0, help="initial factor row norm (1)")
    k.add_argument("--noise-scale", type=_nonneg_float, default=None, help="Gaussian noise std added to v")
    k.add_argument("--no-tangent-noise", action="store_true", help="plain (not tangent-space) noise")
    k.add_argument("--output-constr", action="store_true",
                   help="then minimise the norm keeping the losses at target (needs --target-loss)")
    k.add_argument("--output-constr-lr", type=_positive_float, default=None, help="lr of that phase (default: --lr)")
    k.add_argument("--max-output-constr-iters", type=_positive_int, default=None, help="steps of that phase (200)")
    j = p.add_argument_group("one vector per layer (--joint, optimize_vectors)")
    j.add_argument("--joint", action="store_true", help="optimise one vector per --layer jointly")
    j.add_argument("--regularization-weight", type=_nonneg_float, default=0.0, help="weight of L1/max penalty")
    j.add_argument("--regularization-type", choices=("l1", "max"), default="l1", help="penalty type (l1)")
    j.add_argument("--sparsity-weight", type=_nonneg_float, default=0.0, help="weight of the sum of L2 norms")
    j.add_argument("--entropy-weight", type=_nonneg_float, default=0.0, help="weight of the layer-norm entropy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_optimize)


# ------------------------------------------------------------------------------------------ train


AGGREGATORS = ("mean", "pca", "logistic")


def _cmd_train(args: argparse.Namespace) -> int:
    from .jsonl import load_contrast_pairs
    from .persist import describe_datapoints, save

    _check_model_options(args)
    pairs = load_contrast_pairs(args.pairs)
    _check_out(args.out)
    try:
        from . import contrastive
    except ImportError as exc:
        raise _UserError(f"contrastive training is not available in this installation ({exc})") from None
    factory = getattr(contrastive, f"{args.aggregator}_aggregator", None)
    if factory is None:
        raise _UserError(f"aggregator {args.aggregator!r} is not available in steering_opt.contrastive")
    model, tokenizer = _load_model(args)
    kwargs: dict[str, Any] = dict(layers=args.layer, layer_type=args.site, aggregator=factory(),
                                  read_token_index=args.read_token_index, show_progress=_progress(args))
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    vector = contrastive.train_steering_vector(model, tokenizer, pairs, **kwargs)
    vector.metadata.setdefault("method", "train_steering_vector")
    vector.metadata.update(
        hyperparameters={"aggregator": args.aggregator, "layers": args.layer, "layer_type": args.site,
                         "read_token_index": args.read_token_index, "batch_size": args.batch_size},
        datapoints=describe_datapoints(pairs),
        model=_fingerprint(model, args),
    )
    out = save(vector, args.out)
    norms = ", ".join(f"{k}: {float(v.norm()):.3g}" for k, v in sorted(vector.layer_activations.items()))
    print(f"Trained a {args.aggregator} vector from {len(pairs)} pairs at {vector.layer_type} layer(s) "
          f"{vector.layers}: norms {{{norms}}}")
    print(f"Saved to {out}")
    return 0


def _add_train_parser(sub: Any) -> None:
    from .arch import SITES

    p = sub.add_parser("train", help="train a contrastive (CAA/PCA/probe) vector from contrast pairs",
                       description="Train a steering vector from contrast pairs (JSONL: "
                                   '{"positive": ..., "negative": ...} per line) and save it.')
    _add_model_options(p)
    p.add_argument("--pairs", required=True, metavar="FILE", help="contrast pairs JSONL file")
    p.add_argument("--layer", type=int, nargs="+", default=None, help="layer(s) (default: every layer)")
    p.add_argument("--aggregator", choices=AGGREGATORS, default="mean", help="how to combine differences (mean)")
    p.add_argument("--site", choices=SITES, default="decoder_block", help="where to read/steer (decoder_block)")
    p.add_argument("--read-token-index", type=int, default=-1, help="token whose activation is read (-1: last)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="pairs per forward pass")
    p.add_argument("--out", required=True, help="output folder (or FILE.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------------------- generate


def _parse_vector_specs(specs: list[list[str]] | None) -> list[tuple[str, float]]:
    out = []
    for spec in specs or []:
        if len(spec) > 2:
            raise _UserError(f"--vector takes PATH [MULTIPLIER], got {len(spec)} values: {spec}")
        mult = 1.0
        if len(spec) == 2:
            try:
                mult = _float(spec[1])
            except argparse.ArgumentTypeError:
                raise _UserError(f"--vector {spec[0]}: multiplier must be a number, got {spec[1]!r}") from None
        out.append((spec[0], mult))
    return out


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if path.suffix == ".jsonl":
            from .jsonl import JSONLError, iter_jsonl

            for number, obj in iter_jsonl(path):
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                    raise JSONLError('expected {"prompt": "..."}', str(path), number)
                prompts.append(obj["prompt"])
        else:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise _UserError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


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

    from .persist import atomic_write_file, check_compatible, load

    _check_model_options(args)
    prompts = _read_prompts(args)
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
        _check_writable_file(args.output)
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


def _check_writable_file(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a folder, expected a file path")


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
    p.add_argument("--max-new-tokens", type=_positive_int, default=40, help="tokens to generate (40)")
    p.add_argument("--temperature", type=_nonneg_float, default=0.0, help="sampling temperature; 0 = greedy (0)")
    p.add_argument("--top-p", type=_positive_float, default=1.0, help="nucleus sampling (1.0)")
    p.add_argument("--top-k", type=_nonneg_int, default=0, help="top-k sampling, 0 = off (0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="apply vectors made for another architecture/layer count (same hidden size)")
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="also write the results as JSONL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


# ------------------------------------------------------------------------------------------ sweep


def _steered_loss(model: Any, tokenizer: Any, datapoints: Sequence[Any], coldness: float,
                  do_one_minus: bool) -> float:
    """Total loss (nats) of the datapoints' completions under whatever steering is active."""
    from .sampling import get_completion_logprob_hf

    total = 0.0
    for dp in datapoints:
        for comp in dp.dst_completions:
            total -= float(get_completion_logprob_hf(model, dp.prompt, comp, tokenizer, coldness=coldness))
        for comp in dp.src_completions:
            lp = float(get_completion_logprob_hf(model, dp.prompt, comp, tokenizer, coldness=coldness,
                                                 do_one_minus=do_one_minus))
            total += -lp if do_one_minus else lp
    return total


def _heatmap(layers: list[int], strengths: list[float], losses: list[list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'steering-opt[plot]'); no heatmap")
        return False
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(strengths), 1.0 + 0.5 * len(layers)))
    im = ax.imshow(losses, aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(strengths)), [f"{s:g}" for s in strengths])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("strength (multiplier)")
    ax.set_ylabel("layer")
    ax.set_title("steered loss (nats, lower = closer to target)")
    finite = [v for row in losses for v in row if math.isfinite(v)]
    mid = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, row in enumerate(losses):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                    color="white" if v > mid else "black")
    fig.colorbar(im, ax=ax, label="loss (nats)")
    try:
        _write_png(fig, path)
    finally:
        plt.close(fig)
    return True


def _cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .optimize import optimize_vector
    from .persist import atomic_write_file, save
    from .vector import SteeringVector

    _check_model_options(args)
    datapoints = _read_datapoints(args)
    if len(set(args.layers)) != len(args.layers):
        raise _UserError(f"--layers lists a layer twice: {args.layers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    model, tokenizer = _load_model(args)
    if args.chat:
        datapoints = _apply_chat(datapoints, tokenizer)
    if any(dp.token is not None for dp in datapoints):
        logger.warning("sweep measures the loss steering every position; the datapoints' `token` positions are "
                       "used for optimisation only")
    do_one_minus = not args.no_one_minus
    strengths = list(args.strengths)
    rows: list[dict[str, Any]] = []
    grid: list[list[float]] = []
    bar = tqdm(total=len(args.layers) * (1 + len(strengths)), desc="sweep", disable=not _progress(args))
    try:
        for layer in args.layers:
            vec, info = optimize_vector(model, datapoints, layer, tokenizer=tokenizer, lr=args.lr,
                                        max_iters=args.max_iters, coldness=args.coldness, max_norm=args.max_norm,
                                        do_one_minus=do_one_minus, seed=args.seed)
            bar.update(1)
            vector = SteeringVector.from_optimization(vec, info, layer, metadata={
                "method": "optimize_vector (sweep)", "model": _fingerprint(model, args),
                "hyperparameters": {"lr": args.lr, "max_iters": args.max_iters, "coldness": args.coldness,
                                    "max_norm": args.max_norm, "seed": args.seed}})
            if args.save_vectors:
                save(vector, out / "vectors" / f"layer_{layer}")
            losses = []
            for s in strengths:
                total = 0.0
                for dp in datapoints:  # is_negative datapoints are steered with -v
                    with vector.apply(model, multiplier=-s if dp.is_negative else s):
                        total += _steered_loss(model, tokenizer, [dp], args.coldness, do_one_minus)
                losses.append(total)
                rows.append({"layer": layer, "strength": s, "loss_nats": total, "train_loss_nats": _total_loss(info),
                             "vector_norm": float(vec.norm()), "iters": info["iters"]})
                bar.update(1)
            grid.append(losses)
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_file(out / "sweep.csv", lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))
    doc = {"layers": list(args.layers), "strengths": strengths, "loss_nats": grid, "rows": rows,
           "units": "nats", "model": _model_label(args),
           "settings": {"max_iters": args.max_iters, "lr": args.lr, "coldness": args.coldness,
                        "max_norm": args.max_norm, "seed": args.seed, "do_one_minus": do_one_minus,
                        "chat_template": bool(args.chat), "datapoints": len(datapoints)}}
    atomic_write_file(out / "sweep.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8"))
    header = "layer  " + "  ".join(f"{s:>9g}" for s in strengths)
    print(f"Steered loss (nats) of the datapoints' completions, per layer (rows) and strength (columns); "
          f"vectors optimised for {args.max_iters} steps:")
    print(header)
    for layer, losses in zip(args.layers, grid):
        print(f"{layer:>5}  " + "  ".join(f"{v:>9.4g}" for v in losses))
    best = min(rows, key=lambda r: r["loss_nats"])
    print(f"Lowest loss: layer {best['layer']}, strength {best['strength']:g} ({best['loss_nats']:.4g} nats)")
    print(f"Wrote {out / 'sweep.csv'} and {out / 'sweep.json'}")
    if _heatmap(list(args.layers), strengths, grid, out / "sweep_heatmap.png"):
        print(f"Heatmap: {out / 'sweep_heatmap.png'}")
    return 0


def _add_sweep_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="optimise a vector per layer and measure the loss at several strengths",
                       description="For each --layers L, optimise a vector on the datapoints (few steps), then "
                                   "measure the steered loss (nats) of the datapoints' completions at each "
                                   "--strengths multiplier. Writes sweep.csv, sweep.json and sweep_heatmap.png.")
    _add_model_options(p)
    _add_datapoint_options(p)
    p.add_argument("--layers", type=int, nargs="+", required=True, help="layers to try")
    p.add_argument("--strengths", type=_float, nargs="+", default=list(DEFAULT_STRENGTHS),
                   help="multipliers to try (default: 0 0.5 1 1.5 2)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-iters", type=_nonneg_int, default=10, help="optimiser steps per layer (10)")
    p.add_argument("--lr", type=_positive_float, default=0.1, help="Adam learning rate (0.1)")
    p.add_argument("--coldness", type=_positive_float, default=0.7, help="inverse temperature of the loss (0.7)")
    p.add_argument("--max-norm", type=_positive_float, default=None, help="cap on the vector norm")
    p.add_argument("--no-one-minus", action="store_true", help="suppression loss +sum log p")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--save-vectors", action="store_true", help="also save each layer's vector under OUT/vectors/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)


# ----------------------------------------------------------------------------------------- export


EXPORT_FORMATS = ("gguf", "pt", "npy", "npz")


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
    p.add_argument("--multiplier", type=_float, default=1.0, help="scale baked into the export (1)")
    p.add_argument("--model-hint", default=None, help="GGUF controlvector.model_hint (default: the model type)")
    p.set_defaults(func=_cmd_export)


# ------------------------------------------------------------------------------------------- info


def _describe(vec: Any, indent: str = "") -> list[str]:
    m = vec.metadata
    lines = [f"{indent}kind: {vec.kind}" + (f" (clamp {vec.clamp:g})" if vec.clamp is not None else "")
             + (f" (rank {next(iter(vec.affine.values()))[0].shape[0]})" if vec.affine else ""),
             f"{indent}site: {vec.layer_type}, layers: {vec.layers}, hidden size: {vec.hidden_size}",
             f"{indent}norms: " + ", ".join(f"{k}: {float(v.norm()):.4g}" for k, v in
                                          sorted(vec.layer_activations.items()))]
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    if model:
        parts = [str(model.get(k)) for k in ("architecture", "model_type") if model.get(k)]
        extra = [f"{model[k]} {label}" for k, label in (("hidden_size", "hidden"), ("num_layers", "layers"))
                 if model.get(k) is not None]
        lines.append(f"{indent}model: {model.get('name_or_path') or '?'} ({', '.join(parts + extra)})")
    for key, label in (("method", "method"), ("iters", "iterations"), ("status", "status"),
                       ("output_constr_iters", "norm-minimisation steps"),
                       ("constraints_satisfied", "constraints satisfied")):
        if m.get(key) is not None:
            lines.append(f"{indent}{label}: {m[key]}")
    if m.get("final_loss") is not None:
        lines.append(f"{indent}final loss: {m['final_loss']:.6g} {m.get('loss_units', 'nats')}")
    if m.get("hyperparameters"):
        hp = ", ".join(f"{k}={v}" for k, v in m["hyperparameters"].items() if v is not None)
        lines.append(f"{indent}hyper-parameters: {hp}")
    if m.get("datapoints"):
        lines.append(f"{indent}datapoints: {json.dumps(m['datapoints'], ensure_ascii=False)}")
    for key in ("created_at", "library_version"):
        if m.get(key):
            lines.append(f"{indent}{key.replace('_', ' ')}: {m[key]}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    from .persist import load, read_metadata

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
    if isinstance(obj, dict):
        print(f"{args.path}: a set of {len(obj)} named vectors")
        for name, vec in obj.items():
            print(f"[{name}]")
            print("\n".join(_describe(vec, "  ")))
    else:
        print(f"{args.path}: steering vector")
        print("\n".join(_describe(obj, "  ")))
    return 0


def _add_info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="print a saved vector's metadata (after verifying it)")
    p.add_argument("path", help="saved vector or set (folder, .safetensors, .gguf, legacy .json/.pt)")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(func=_cmd_info)


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = _Parser(prog="steering-opt", description="Find and apply steering vectors for HF causal LMs.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_optimize_parser(sub)
    _add_train_parser(sub)
    _add_generate_parser(sub)
    _add_sweep_parser(sub)
    _add_export_parser(sub)
    _add_info_parser(sub)
    demo = sub.add_parser("demo", help="run the demo on the embedded model")
    _add_model_options(demo)
    demo.add_argument("--max-new-tokens", type=_positive_int, default=40,
                      help="tokens to generate per completion (default: 40)")
    demo.add_argument("--layer", type=int, default=6, help="layer to steer (default: 6)")
    demo.add_argument("--max-iters", type=_positive_int, default=30, help="optimiser steps (default: 30)")
    demo.set_defaults(func=_cmd_demo)
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
