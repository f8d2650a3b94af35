"""Should auto_steer also try a calibrated strength or a KL-trained vector? Judged on validation prompts.

Usage::

    python benchmarks/bench_auto_candidates.py                    # every task, 12 validation prompts, 32 tokens
    python benchmarks/bench_auto_candidates.py --tasks pirate_persona,topic_food --kl-weights 1,10

For each task (``benchmarks/quality_tasks.py``, its one training datapoint), candidates built from auto_steer's
run, each judged by generating on auto_steer's built-in generic **validation** prompts (never the test prompts;
the task's scorer and the fluency checks, as ``benchmarks/bench_signal.py`` does):

* ``auto_steer``: its choice with the defaults;
* ``calibrated B``: the chosen layer's vector at the multiplier where the mean KL on auto_steer's neutral
  prompts is ``B`` nats (``steering_opt.calibrate_strength``), for each ``--budgets`` value;
* ``kl_weight λ``: auto_steer with ``optimize_kwargs={"kl_weight": λ}`` (the KL term in every candidate's
  training), for each ``--kl-weights`` value.

Prints one JSON object per line (``{"kind": "task", ...}``, with each candidate's layer, multiplier, KL, margin
gain, validation success and fluent success and its build time) and a summary with the mean validation fluent
success per candidate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks  # noqa: E402

import steering_opt as so  # noqa: E402
from steering_opt.evaluate import DEFAULT_NEUTRAL_PROMPTS, Evaluator  # noqa: E402
from steering_opt.sweep import DEFAULT_KL_BUDGET, GENERIC_CHAT_PROMPTS, GENERIC_PROMPTS  # noqa: E402


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def run_task(model: Any, tok: Any, task: quality_tasks.Task, args: argparse.Namespace) -> dict[str, Any]:
    dp = task.datapoint(tok)
    val = list(GENERIC_CHAT_PROMPTS if task.chat else GENERIC_PROMPTS)[: args.val_prompts]
    judge = Evaluator(model, tok, val, scorer=task.scorer, chat=task.chat, max_new_tokens=args.max_new_tokens,
                      fluency_lang=task.lang, promote=[task.dst], suppress=[task.src])
    judge.baseline()
    out: dict[str, Any] = {"kind": "task", "task": task.name, "candidates": {}}

    def record(name: str, vec: Any, multiplier: float, layer: int, build_s: float) -> None:
        s = judge.evaluate(vec, multiplier).summary
        out["candidates"][name] = {
            "layer": layer, "multiplier": round(multiplier, 3), "kl": s.get("kl"), "margin_gain": s.get("margin_gain"),
            "success": s["success_rate"], "fluent_success": s["fluent_success_rate"], "build_s": round(build_s, 1)}

    t = time.perf_counter()
    vec, report = so.auto_steer(model, tok, [dp], seed=0, progress=False)
    best = report.best or {}
    record("auto_steer", vec, 1.0, best["layer"], time.perf_counter() - t)
    base = report.vectors[(best["layer"], best["variant"])]
    for budget in args.budgets:
        t = time.perf_counter()
        try:
            m = so.calibrate_strength(model, tok, base, budget, list(DEFAULT_NEUTRAL_PROMPTS), chat=task.chat)
        except ValueError as e:  # the budget cannot be reached: say so instead of a row
            out["candidates"][f"calibrated {budget:g}"] = {"error": str(e)}
            continue
        record(f"calibrated {budget:g}", base, m, best["layer"], time.perf_counter() - t)
    for lam in args.kl_weights:
        t = time.perf_counter()
        vec_k, rep_k = so.auto_steer(model, tok, [dp], seed=0, progress=False, optimize_kwargs={"kl_weight": lam})
        record(f"kl_weight {lam:g}", vec_k, 1.0, (rep_k.best or {})["layer"], time.perf_counter() - t)
    emit(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="all", help="comma-separated task names (benchmarks/quality_tasks.py)")
    ap.add_argument("--budgets", default=str(DEFAULT_KL_BUDGET), help="calibrated: KL budgets (nats), comma-separated")
    ap.add_argument("--kl-weights", default="1", help="kl_weight values (the KL term in training), comma-separated")
    ap.add_argument("--val-prompts", type=int, default=12, help="validation prompts judged per candidate")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    args.budgets = [float(x) for x in args.budgets.split(",") if x]
    args.kl_weights = [float(x) for x in args.kl_weights.split(",") if x]
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in quality_tasks.TASKS if args.tasks == "all" or t.name in args.tasks.split(",")]
    if not tasks:
        ap.error(f"--tasks: none of {args.tasks!r}; choose from {[t.name for t in quality_tasks.TASKS]}")
    model, tok = so.load_model()
    rows = [run_task(model, tok, t, args) for t in tasks]
    names = list(rows[0]["candidates"])
    emit({"kind": "summary", "val_prompts": args.val_prompts, "max_new_tokens": args.max_new_tokens,
          "mean_val_fluent_success": {
              n: round(statistics.mean(r["candidates"][n].get("fluent_success", 0.0) for r in rows), 3)
              for n in names}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
