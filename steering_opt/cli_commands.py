"""The measuring subcommands of ``steering-opt`` (``sweep``, ``evaluate``, ``auto-steer``) and the helpers every
subcommand shares once its arguments are read: loading the model (with a line on stderr saying so), the model
fingerprint recorded in saved vectors, progress bars, atomic text and figure writes.

Like :mod:`steering_opt.cli`, this module imports the library (hence torch) only inside functions, so that
``steering-opt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cli_args import (
    FLOAT,
    NONNEG_FLOAT,
    NONNEG_INT,
    POS_FLOAT,
    POS_INT,
    SEED,
    add_datapoint_options,
    add_model_options,
    add_option_flags,
    add_vector_option,
    apply_chat,
    check_model_options,
    check_output,
    check_unique,
    options_from_args,
    or_none,
    read_datapoints,
    read_prompts_file,
    read_vectors,
)

__all__ = [
    "SWEEP_MANAGED",
    "add_auto_steer_parser",
    "add_evaluate_parser",
    "add_sweep_parser",
    "announce_loading",
    "check_vectors",
    "fingerprint",
    "json_safe",
    "load_model_for",
    "model_label",
    "norms_text",
    "progress_enabled",
    "save_figure",
    "write_text",
]

logger = logging.getLogger(__name__)

#: OptimizeOptions fields that ``sweep`` / ``auto-steer`` set themselves (their variants and seed), cannot use
#: (affine maps and per-layer regularisers) or whose flag they spend on their own setting (``--kl-weight``: the
#: weight of the neutral-prompt KL in their score).
SWEEP_MANAGED = ("seed", "max_norm", "vector_clamp", "affine_rank", "max_affine_norm", "starting_affine_norm",
                 "regularization_weight", "regularization_type", "sparsity_weight", "entropy_weight", "kl_weight")


# ------------------------------------------------------------------------------------ shared helpers


def model_label(args: argparse.Namespace) -> str:
    """The model as the user named it (``--model``), or the embedded model's name."""
    from .models import EMBEDDED_MODEL_NAME

    return args.model or EMBEDDED_MODEL_NAME


def announce_loading(args: argparse.Namespace) -> None:
    """Say on stderr which model is being loaded (``loading NAME ...``), also without ``-v`` (with it, the
    library's log says so)."""
    from .models import EMBEDDED_MODEL_NAME, embedded_cache_path, is_cache_valid

    if not getattr(args, "verbose", 0):
        label = model_label(args)
        note = ""
        if label == EMBEDDED_MODEL_NAME and not is_cache_valid(embedded_cache_path()):
            note = " (first use: converting the bundled GGUF file, about 20 s)"
        print(f"loading {label}{note} ...", file=sys.stderr, flush=True)


def load_model_for(args: argparse.Namespace) -> tuple[Any, Any]:
    """``load_model(--model, --device, --dtype)``, announced (:func:`announce_loading`)."""
    from .models import load_model

    dtype = check_model_options(args)
    announce_loading(args)
    return load_model(args.model, device=args.device, dtype=dtype)


def fingerprint(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The model fingerprint saved with a vector, named as the user named the model."""
    from .arch import model_fingerprint

    return {**model_fingerprint(model), "name_or_path": model_label(args)}


def check_vectors(loaded: Sequence[tuple[str, Any, float]], model: Any, args: argparse.Namespace) -> None:
    """Refuse (or with --allow-model-mismatch warn about) vectors made for another model."""
    from . import validate
    from .persist import check_compatible

    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    for where, vec, mult in loaded:
        check_compatible(vec, model, allow_mismatch=args.allow_model_mismatch, source=where,
                         model_name=model_label(args))
        if dtype is not None:  # the values the model will add: the vector times its multiplier, in its dtype
            for layer, t in vec.layer_activations.items():
                validate.finite_in_dtype(f"{where} x{mult:g}: layer {layer}", t.double() * mult, dtype)


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--no-progress`` turns bars off; otherwise the library's rule (a terminal, or STEERING_OPT_PROGRESS)."""
    from .progress import show_progress

    return not args.no_progress and show_progress(None)


def norms_text(vector: Any, fmt: str = ".3g") -> str:
    return ", ".join(f"{k}: {float(v.norm()):{fmt}}" for k, v in sorted(vector.layer_activations.items()))


def save_figure(draw: Callable[[], Any], path: Path, what: str) -> bool:
    """Write the Figure that ``draw()`` returns as a PNG, atomically; a warning, not an error, without matplotlib."""
    from .fsutil import atomic_write_file

    try:
        fig = draw()
    except ImportError as exc:
        logger.warning("%s; no %s", exc, what)
        return False
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return True


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    from .fsutil import atomic_write_file

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write_file(path, write)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as None (JSON has neither) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _library_defaults(p: argparse.ArgumentParser, flags: dict[str, dict[str, Any]], fn: Callable) -> None:
    """``flags`` (``{flag: add_argument kwargs}`` whose ``dest`` are keywords of ``fn``) with ``fn``'s defaults."""
    defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items()}
    for flag, kwargs in flags.items():
        default = defaults[kwargs["dest"]]
        p.add_argument(flag, **{**kwargs, "default": list(default) if isinstance(default, tuple) else default,
                                "help": kwargs["help"] + " (default: %(default)s)"})


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ------------------------------------------------------------------------------------------ sweep


#: sweep flags that are steering_opt.sweep.sweep() keywords (``dest``); their defaults are sweep()'s.
SWEEP_FLAGS: dict[str, dict[str, Any]] = {
    "--layers": dict(dest="layers", type=int, nargs="+", help="layers to try (None: chosen from the depth)"),
    "--strengths": dict(dest="multipliers", type=FLOAT, nargs="+", help="multipliers to try"),
    "--max-norm": dict(dest="max_norms", type=or_none(POS_FLOAT), nargs="+",
                       help="norm caps, each one variant (none: no cap)"),
    "--clamp": dict(dest="clamps", type=FLOAT, nargs="+", help="clamp coefficients, each one more variant"),
    "--scorer": dict(dest="scorer", help="success scorer spec, e.g. refusal or language:es (generates)"),
    "--criterion": dict(dest="criterion", choices=("auto", "margin", "fluent_success", "success"),
                        help="what the recommended row maximises (auto: fluent_success with --scorer, else margin)"),
    "--kl-weight": dict(dest="kl_weight", type=NONNEG_FLOAT, help="weight of the neutral-prompt KL in 'margin'"),
    "--max-new-tokens": dict(dest="max_new_tokens", type=POS_INT, help="tokens generated per validation prompt"),
    "--time-budget": dict(dest="time_budget_s", type=POS_FLOAT, metavar="SECONDS",
                          help="start no new layer/variant once this much time would be exceeded"),
    "--seed": dict(dest="seed", type=SEED, help="seed of the train/validation split and the optimiser"),
}


def _write_table_files(out: Path, rows: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "sweep.csv", buf.getvalue())
    write_text(out / "sweep.json", json.dumps(doc, indent=2))


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .persist import describe_datapoints, save
    from .plots import plot_sweep_heatmap
    from .sweep import sweep

    options = options_from_args(args)
    check_unique("--layers", args.layers)
    check_model_options(args)
    datapoints = read_datapoints(args)
    validation = read_prompts_file(args.validation_prompts) if args.validation_prompts else None
    out = check_output(args.out, "folder")
    model, tokenizer = load_model_for(args)
    described = describe_datapoints(datapoints)
    if args.chat:
        datapoints = apply_chat(datapoints, tokenizer)
    settings = {f["dest"]: getattr(args, f["dest"]) for f in SWEEP_FLAGS.values()}
    optimize_kwargs = {name: getattr(options, name) for name in args.option_fields}
    result = sweep(model, tokenizer, datapoints, validation_prompts=validation, optimize_kwargs=optimize_kwargs,
                   progress=progress_enabled(args), **settings)
    rows = [json_safe(r) for r in result.table]
    _write_table_files(out, rows, {
        "criterion": result.criterion, "best": json_safe(result.best or {}), "rows": rows, "notes": result.notes,
        "baseline": json_safe(result.baseline), "validation_prompts": result.validation_prompts, "chat": result.chat,
        "time_s": result.time_s, "model": model_label(args), "settings": {
            **settings, "optimize": optimize_kwargs, "chat_template": args.chat, "datapoints": len(datapoints)}})
    saves = {"best": result.best_steering()}
    if args.save_vectors:
        saves.update({f"vectors/layer_{layer}" + ("" if variant == "additive" else "_" + variant.replace("=", "")):
                      vec for (layer, variant), vec in result.vectors.items()})
    for name, vec in saves.items():
        vec.metadata["model"] = fingerprint(model, args)
        vec.metadata.setdefault("datapoints", described)
        save(vec, out / name)
    print(result.to_markdown())
    for note in result.notes:
        print(f"Note: {note}")
    b = result.best
    assert b is not None  # result.best_steering() above raised without one
    print(f"Best by {result.criterion} (higher is better): layer {b['layer']}, {b['variant']}, strength "
          f"{b['multiplier']:g} ({result.criterion} = {b['criterion']:.4g})")
    print(f"Recommended steering, already scaled: {out / 'best'} (steering-opt generate --vector {out / 'best'})")
    print(f"Wrote {out / 'sweep.csv'} and {out / 'sweep.json'}")
    if save_figure(lambda: plot_sweep_heatmap(result), out / "sweep_heatmap.png", "heatmap"):
        print(f"Heatmap: {out / 'sweep_heatmap.png'}")
    return 0


def _add_sweep_library_flags(p: argparse.ArgumentParser) -> None:
    """SWEEP_FLAGS with sweep()'s defaults, and the optimiser's flags with the sweep's optimiser defaults."""
    from .sweep import DEFAULT_OPTIMIZE_KWARGS, sweep

    _library_defaults(p, SWEEP_FLAGS, sweep)
    add_option_flags(p, exclude=SWEEP_MANAGED, defaults=DEFAULT_OPTIMIZE_KWARGS)


def add_sweep_parser(root: Any, sub: Any) -> None:
    p = root.add_command(
        sub, "sweep", help="measure steering over layers x strengths (x norm caps / clamps) and recommend one",
        description="steering_opt.sweep: for each layer (and variant) optimise a vector on the datapoints, measure "
                    "it at each strength on validation prompts (held-out datapoints, --validation-prompts or "
                    "built-in ones) and rank the rows by --criterion (the log-prob margin gain minus the KL on "
                    "neutral prompts, or with --scorer the fluent success rate). Writes sweep.csv, sweep.json, "
                    "sweep_heatmap.png and the recommended vector, already scaled (OUT/best).")
    add_model_options(p)
    add_datapoint_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--validation-prompts", metavar="FILE", default=None,
                   help='validation prompts: one per line (.txt) or {"prompt": ...} per line (.jsonl)')
    p.add_argument("--save-vectors", action="store_true", help="also save every vector under OUT/vectors/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.deferred.append(_add_sweep_library_flags)
    p.set_defaults(func=_cmd_sweep)


# --------------------------------------------------------------------------------------- evaluate


#: evaluate flags that are steering_opt.evaluate.evaluate() keywords (``dest``); their defaults are evaluate()'s.
EVALUATE_FLAGS: dict[str, dict[str, Any]] = {
    "--multiplier": dict(dest="multiplier", type=FLOAT, help="strength applied on top of each vector's own"),
    "--scorer": dict(dest="scorer", help="success scorer spec, e.g. refusal or language:es"),
    "--promote": dict(dest="promote", nargs="+", metavar="TEXT",
                      help="completions whose log-prob gain is measured (margin)"),
    "--suppress": dict(dest="suppress", nargs="+", metavar="TEXT",
                       help="completions whose log-prob loss is measured (margin)"),
    "--max-new-tokens": dict(dest="max_new_tokens", type=POS_INT, help="tokens generated per prompt"),
    "--seed": dict(dest="seed", type=SEED, help="generation seed"),
}

#: (label, steered summary key, unsteered summary key or None, unit) of the evaluate table.
_EVAL_ROWS = (
    ("success rate", "success_rate", "unsteered_success_rate", ""),
    ("fluent success rate", "fluent_success_rate", "unsteered_fluent_success_rate", ""),
    ("fluent rate", "fluent_rate", None, ""),
    ("perplexity (unsteered model)", "perplexity", "unsteered_perplexity", ""),
    ("distinct-2", "distinct2", None, ""),
    ("repetition (seq-rep-4)", "repetition", None, ""),
    ("real words", "real_words", None, ""),
    ("KL on neutral prompts", "kl", None, "nats"),
    ("margin gain", "margin_gain", None, "nats"),
    ("promote gain", "promote_gain", None, "nats"),
    ("suppress gain", "suppress_gain", None, "nats"),
)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import DEFAULT_NEUTRAL_PROMPTS, evaluate
    from .sweep import GENERIC_CHAT_PROMPTS, GENERIC_PROMPTS

    check_model_options(args)
    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    builtin = not prompts
    if builtin:
        prompts = list(GENERIC_CHAT_PROMPTS if args.chat else GENERIC_PROMPTS)
    loaded = read_vectors(args.vector)
    if args.output is not None:
        check_output(args.output, "file")
    model, tokenizer = load_model_for(args)
    check_vectors(loaded, model, args)
    settings = {f["dest"]: getattr(args, f["dest"]) for f in EVALUATE_FLAGS.values()}
    result = evaluate(model, tokenizer, [(vec, mult) for _, vec, mult in loaded], prompts, chat=args.chat,
                      generate=not args.no_generate, neutral_prompts=None if args.no_kl else DEFAULT_NEUTRAL_PROMPTS,
                      **settings)
    steering = ", ".join(f"{where} x{mult:g}" for where, _, mult in loaded)
    print(f"Steering: {steering}" + (f" (x{args.multiplier:g} on top)" if args.multiplier != 1 else ""))
    print(f"Prompts: {len(prompts)}" + (" built-in generic prompts (give --prompt or --prompts-file)" if builtin
                                       else ""))
    s = result.summary
    rows = [("metric", "steered", "unsteered", "unit")]
    rows += [(label, _cell(s.get(key)), _cell(s.get(base)) if base else "", unit)
             for label, key, base, unit in _EVAL_ROWS if s.get(key) is not None]
    _print_table(rows)
    if not args.no_generate and args.show:
        print()
        print(result.show(args.show))
    if args.output is not None:
        doc = {"model": model_label(args), "steering": [{"vector": where, "multiplier": mult}
                                                       for where, _, mult in loaded],
               "summary": result.summary, "config": result.config, "records": result.records}
        write_text(args.output, json.dumps(json_safe(doc), indent=2, ensure_ascii=False) + "\n")
        print(f"Wrote {args.output}")
    return 0


def _add_evaluate_library_flags(p: argparse.ArgumentParser) -> None:
    from .evaluate import evaluate

    _library_defaults(p, EVALUATE_FLAGS, evaluate)


def add_evaluate_parser(root: Any, sub: Any) -> None:
    p = root.add_command(
        sub, "evaluate", help="measure saved vectors on held-out prompts (success, fluency, KL, perplexity)",
        description="steering_opt.evaluate: generate with and without the vectors on held-out prompts and "
                    "report the success rate (--scorer), fluency, perplexity, the KL on neutral prompts and the "
                    "log-prob margin of --promote/--suppress completions (nats). Prints a table; --output "
                    "writes every number and text as JSON.")
    add_model_options(p)
    add_vector_option(p, required=True)
    p.add_argument("--prompt", action="append", default=None, help="held-out prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help='held-out prompts: one per line (.txt) or {"prompt": ...} per line (.jsonl); default: '
                        "built-in generic prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--no-generate", action="store_true", help="only the log-prob and KL metrics (fast)")
    p.add_argument("--no-kl", action="store_true", help="skip the KL on neutral prompts")
    p.add_argument("--show", type=NONNEG_INT, default=5, help="prompts whose texts are printed (default: 5)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the full results as JSON")
    p.deferred.append(_add_evaluate_library_flags)
    p.set_defaults(func=_cmd_evaluate)


# ------------------------------------------------------------------------------------- auto-steer


#: auto-steer flags that are steering_opt.sweep.auto_steer() keywords (``dest``); defaults are auto_steer()'s.
AUTO_STEER_FLAGS: dict[str, dict[str, Any]] = {
    "--layers": dict(dest="layers", type=int, nargs="+", help="candidate layers (None: chosen from the depth)"),
    "--strengths": dict(dest="multipliers", type=FLOAT, nargs="+", help="candidate strengths"),
    "--norm-fractions": dict(dest="norm_fractions", type=or_none(POS_FLOAT), nargs="+",
                             help="norm caps as fractions of the residual-stream norm (none: no cap)"),
    "--scorer": dict(dest="scorer", help="success scorer spec, e.g. refusal or language:es (then generates)"),
    "--kl-weight": dict(dest="kl_weight", type=NONNEG_FLOAT, help="weight of the neutral-prompt KL"),
    "--kl-budget": dict(dest="kl_budget", type=or_none(POS_FLOAT), metavar="NATS",
                        help="KL ceiling: configurations above it rank last (none: no ceiling)"),
    "--calibrate-kl": dict(dest="calibrate_kl", type=or_none(POS_FLOAT), metavar="NATS",
                           help="lower the chosen strength until the KL is this (none: keep it; not with --scorer)"),
    "--repetition-check": dict(dest="repetition_check", type=int, metavar="N",
                               help="validation prompts the choice generates on to check it does not repeat itself "
                                    "(0: no check; not with --scorer)"),
    "--time-budget": dict(dest="time_budget_s", type=POS_FLOAT, metavar="SECONDS", help="soft wall-time budget"),
    "--seed": dict(dest="seed", type=SEED, help="optimiser seed"),
}


def _cmd_auto_steer(args: argparse.Namespace) -> int:
    from .persist import describe_datapoints, save
    from .sweep import auto_steer

    options = options_from_args(args)
    check_unique("--layers", args.layers)
    check_model_options(args)
    datapoints = read_datapoints(args)
    validation = read_prompts_file(args.validation_prompts) if args.validation_prompts else None
    check_output(args.out, "save")
    if args.output is not None:
        check_output(args.output, "file")
    model, tokenizer = load_model_for(args)
    described = describe_datapoints(datapoints)
    if args.chat:
        datapoints = apply_chat(datapoints, tokenizer)
    settings = {f["dest"]: getattr(args, f["dest"]) for f in AUTO_STEER_FLAGS.values()}
    optimize_kwargs = {name: getattr(options, name) for name in args.option_fields}
    steering, report = auto_steer(model, tokenizer, datapoints, validation_prompts=validation,
                                  optimize_kwargs=optimize_kwargs, progress=progress_enabled(args), **settings)
    steering.metadata.update(model=fingerprint(model, args), datapoints=described, chat_template=bool(args.chat),
                             hyperparameters={**optimize_kwargs, **settings})
    out = save(steering, args.out)
    print(report.to_markdown())
    for note in report.notes:
        print(f"Note: {note}")
    b = report.best
    assert b is not None  # report.best_steering() raised without one
    print(f"Chosen by {report.criterion} (higher is better): layer {b['layer']}, {b['variant']}, strength "
          f"{b['multiplier']:g} ({report.criterion} = {_cell(b.get('criterion'))}) in {report.time_s:.0f} s")
    print(f"Saved the steering, already scaled, to {out} (steering-opt generate --vector {out})")
    if args.output is not None:
        doc = {"criterion": report.criterion, "best": b, "rows": report.table, "notes": report.notes,
               "validation_prompts": report.validation_prompts, "chat": report.chat, "time_s": report.time_s,
               "model": model_label(args), "vector": str(out),
               "settings": {**settings, "optimize": optimize_kwargs, "chat_template": args.chat}}
        write_text(args.output, json.dumps(json_safe(doc), indent=2, ensure_ascii=False) + "\n")
        print(f"Wrote {args.output}")
    return 0


def _add_auto_steer_library_flags(p: argparse.ArgumentParser) -> None:
    from .sweep import AUTO_STEER_OPTIMIZE_KWARGS, auto_steer

    _library_defaults(p, AUTO_STEER_FLAGS, auto_steer)
    add_option_flags(p, exclude=SWEEP_MANAGED, defaults=AUTO_STEER_OPTIMIZE_KWARGS)


def add_auto_steer_parser(root: Any, sub: Any) -> None:
    p = root.add_command(
        sub, "auto-steer", help="from datapoint(s) to a measured, ready-to-use steering vector",
        description="steering_opt.auto_steer: optimise a vector at each candidate layer (and norm cap), measure "
                    "it at each strength on validation prompts (the log-prob margin gain minus the KL on neutral "
                    "prompts; with --scorer the best few are then judged by generating), and save the best one, "
                    "already scaled.")
    add_model_options(p)
    add_datapoint_options(p)
    p.add_argument("--out", required=True, help="where to save the chosen vector (folder or FILE.safetensors)")
    p.add_argument("--validation-prompts", metavar="FILE", default=None,
                   help='validation prompts: one per line (.txt) or {"prompt": ...} per line (.jsonl); default: '
                        "built-in generic prompts")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the report (table) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.deferred.append(_add_auto_steer_library_flags)
    p.set_defaults(func=_cmd_auto_steer)
