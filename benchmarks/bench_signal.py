"""Which signal should auto_steer rank by? Leave-one-task-out on the quality benchmark's tasks.

Usage::

    python benchmarks/bench_signal.py                     # every task, 12 validation prompts, 32 new tokens
    python benchmarks/bench_signal.py --test 24           # also judge each left-out choice on 24 test prompts
    python benchmarks/bench_signal.py --from /tmp/signal.json --test 24   # re-use the grids of an earlier run
                                                                          # (its --out file or its printed lines)

For each task (``benchmarks/quality_tasks.py``, its one training datapoint): auto_steer's grid (its candidate
layers × strengths, its optimiser, :data:`steering_opt.sweep.AUTO_STEER_OPTIMIZE_KWARGS`) measured with
``steering_opt.sweep`` on auto_steer's built-in generic **validation** prompts (never the test prompts): the
promoted-over-suppressed log-prob gain per token, the KL on the built-in neutral prompts, and fluent success by
generating (the task's scorer and the fluency checks). Candidate signals, each picking one row per task: the
penalty ``margin − λ·KL`` for several λ (λ = 1 was auto_steer's first signal), and the budget ``margin`` among the
rows with ``KL ≤ B`` for several B (auto_steer's now: B = 3 nats). Leave-one-task-out: for each task, the signal
whose picks have the highest mean validation fluent success on the *other* tasks (ties: the earlier in the list,
which starts with the λ = 1 penalty); the row it picks on the left-out task is reported with that task's validation
fluent success and the best any row reached there (the oracle). ``--test N`` judges the left-out choices, and the
λ = 1 penalty's choices, on the first N test prompts.

Prints one JSON object per line (``{"kind": ...}``) and a final summary; ``--out`` also writes everything.
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
from steering_opt.evaluate import Evaluator  # noqa: E402
from steering_opt.fsutil import atomic_write_file  # noqa: E402
from steering_opt.sweep import AUTO_STEER_OPTIMIZE_KWARGS, GENERIC_CHAT_PROMPTS, GENERIC_PROMPTS  # noqa: E402

#: name -> (row -> score); the first is the reference ``--test`` compares with (ties go to the earlier signal).
SIGNALS: dict[str, Any] = {
    **{f"penalty {w:g}": (lambda r, w=w: r["margin_gain_per_token"] - w * r["kl"])
       for w in (1.0, 0.0, 0.25, 0.5, 0.75, 1.5, 2.0, 4.0)},
    **{f"budget {b:g}": (lambda r, b=b: r["margin_gain_per_token"] if r["kl"] <= b else -1e9 - r["kl"])
       for b in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)},
}
KEEP = ("layer", "multiplier", "margin_gain_per_token", "kl", "success_rate", "fluent_success_rate", "norm",
        "train_loss")


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def grid(model: Any, tok: Any, task: quality_tasks.Task, args: argparse.Namespace) -> list[dict[str, Any]]:
    """auto_steer's grid for ``task``, every row judged by generating on the validation prompts."""
    dp = task.datapoint(tok)
    val = list(GENERIC_CHAT_PROMPTS if task.chat else GENERIC_PROMPTS)
    t = time.perf_counter()
    res = so.sweep(model, tok, [dp], validation_prompts=val, chat=task.chat, scorer=task.scorer, generate=True,
                   multipliers=[0.5, 1.0, 1.5, 2.0], max_new_tokens=args.max_new_tokens,
                   optimize_kwargs=dict(AUTO_STEER_OPTIMIZE_KWARGS), seed=0, progress=False)
    rows = [{k: r.get(k) for k in KEEP} for r in res.table]
    emit({"kind": "grid", "task": task.name, "time_s": round(time.perf_counter() - t, 1), "rows": rows})
    return rows


def pick(rows: list[dict[str, Any]], signal: str) -> dict[str, Any]:
    """The row ``SIGNALS[signal]`` ranks first (ties: lower KL, lower strength)."""
    fn = SIGNALS[signal]
    return max(rows, key=lambda r: (fn(r), -r["kl"], -abs(r["multiplier"])))


def leave_one_out(grids: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for task, rows in grids.items():
        others = [t for t in grids if t != task]
        score = {x: statistics.mean(pick(grids[t], x)["fluent_success_rate"] for t in others) for x in SIGNALS}
        w = max(SIGNALS, key=lambda x: score[x])  # max() keeps the first of equal scores
        chosen = pick(rows, w)
        out.append({"kind": "loto", "task": task, "signal": w, "others_mean_fluent": round(score[w], 3),
                    "layer": chosen["layer"], "multiplier": chosen["multiplier"],
                    "val_fluent_success": chosen["fluent_success_rate"],
                    "val_oracle": max(r["fluent_success_rate"] for r in rows),
                    "per_signal_val_fluent": {x: pick(rows, x)["fluent_success_rate"] for x in SIGNALS}})
    return out


def judge_on_test(model: Any, tok: Any, task: quality_tasks.Task, choice: dict[str, Any],
                  args: argparse.Namespace) -> dict[str, Any]:
    """The left-out choice rebuilt (same optimiser and seed) and judged on the task's first ``--test`` prompts."""
    dp = task.datapoint(tok)
    r = so.optimize(model, tok, [dp], choice["layer"], seed=0, progress=False, **AUTO_STEER_OPTIMIZE_KWARGS)
    ev = Evaluator(model, tok, task.test_prompts[: args.test], scorer=task.scorer, chat=task.chat,
                   max_new_tokens=args.max_new_tokens, fluency_lang=task.lang, neutral_prompts=None)
    s = ev.evaluate(r.to_steering_vector(), choice["multiplier"]).summary
    return {"test_success": s["success_rate"], "test_fluent_success": s["fluent_success_rate"]}


def load_grids(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The grids of an earlier run: its ``--out`` file, or its printed lines (``{"kind": "grid", ...}``)."""
    text = path.read_text(encoding="utf-8")
    try:
        return dict(json.loads(text)["grids"])
    except (json.JSONDecodeError, KeyError, TypeError):
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        return {x["task"]: x["rows"] for x in lines if x.get("kind") == "grid"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tasks", default="all", help="comma-separated task names (benchmarks/quality_tasks.py)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--test", type=int, default=0, help="judge each left-out choice on this many test prompts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--from", dest="from_", default=None,
                    help="re-use the grids of an earlier run (its --out file or its printed lines)")
    ap.add_argument("--out", default=None, help="also write every result to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in quality_tasks.TASKS if args.tasks == "all" or t.name in args.tasks.split(",")]
    if len(tasks) < 2:
        ap.error("--tasks: leave-one-task-out needs at least two tasks")
    model, tok = so.load_model(device=args.device, dtype=args.dtype)
    previous = load_grids(Path(args.from_)) if args.from_ else {}
    grids = {t.name: previous[t.name] if t.name in previous else grid(model, tok, t, args) for t in tasks}
    loto = leave_one_out(grids)
    default = next(iter(SIGNALS))
    for row in loto:
        if args.test:  # the left-out choice and, for comparison, the default signal's choice
            task = next(t for t in tasks if t.name == row["task"])
            row.update(judge_on_test(model, tok, task, row, args))
            d = pick(grids[row["task"]], default)
            same = (d["layer"], d["multiplier"]) == (row["layer"], row["multiplier"])
            got = {k: row[k] for k in ("test_success", "test_fluent_success")} if same else \
                judge_on_test(model, tok, task, d, args)
            row["default"] = {"signal": default, "layer": d["layer"], "multiplier": d["multiplier"],
                              "val_fluent_success": d["fluent_success_rate"], **got}
        emit(row)
    summary = {"kind": "summary", "signals": list(SIGNALS), "max_new_tokens": args.max_new_tokens,
               "optimize_kwargs": AUTO_STEER_OPTIMIZE_KWARGS, "loto": loto,
               "mean_val_fluent_by_signal": {x: round(statistics.mean(
                   pick(g, x)["fluent_success_rate"] for g in grids.values()), 3) for x in SIGNALS}}
    emit(summary)
    if args.out:
        text = json.dumps({"grids": grids, **summary}, indent=1) + "\n"
        atomic_write_file(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
