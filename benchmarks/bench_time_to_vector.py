"""Time to a working vector: steps and wall time per optimiser, auto_steer's wall time, start-up time.

Usage::

    python benchmarks/bench_time_to_vector.py                        # CPU, float32, embedded model
    python benchmarks/bench_time_to_vector.py --device cuda --dtype bfloat16
    python benchmarks/bench_time_to_vector.py --tasks english_to_spanish --no-auto --no-startup

Tasks: the training datapoint of each quality-benchmark task (``benchmarks/quality_tasks.py``;
``english_to_spanish`` is llm-steering-opt's tutorial datapoint), steered at ``--layer``.

Per task: the recipe (``optimizer="adam"``, lr 0.1, 30 steps, no plateau stop) gives the reference final loss
L30 (it is the Adam lr 0.1 row: 30 steps to L30 by definition). Every other method then runs with
``target_loss=L30`` and at most ``--max-steps`` steps: its steps and loss
evaluations to reach L30 (``reached``: whether it did), wall time, final loss. ``default`` is the project's own
API as it comes (``optimize(..., lr=0.1, max_iters=30)``: Adam with the default plateau stop, no target). Each
method's vector is then measured on the task's held-out test prompts without generating: ``margin_gain`` (how
much it raises log p(promoted) − log p(suppressed), nats, mean over prompts, at strength 1) and ``kl`` (mean
KL(unsteered ‖ steered), nats, on the built-in neutral prompts).

Then ``auto_steer(model, tok, [datapoint], seed=0)`` per task (no scorer): wall time and its choice; and the
medians over 5 runs of ``python -c "import steering_opt"`` and ``steering-opt --help``.
Prints one JSON object per line (``{"kind": ...}``) and a final summary object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks  # noqa: E402

import steering_opt as so  # noqa: E402
from steering_opt.evaluate import Evaluator  # noqa: E402

RECIPE = {"optimizer": "adam", "lr": 0.1, "max_iters": 30, "plateau_patience": None}

#: name -> optimize() options (on top of the target / step cap).
METHODS: dict[str, dict[str, Any]] = {
    "adam lr0.2": {"optimizer": "adam", "lr": 0.2},
    "adam_cosine lr0.2": {"optimizer": "adam_cosine", "lr": 0.2},
    "normalized lr0.1": {"optimizer": "normalized", "lr": 0.1},
    "lbfgs lr0.1": {"optimizer": "lbfgs", "lr": 0.1},
    "lbfgs lr0.3": {"optimizer": "lbfgs", "lr": 0.3},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_cmd(cmd: list[str], n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def make_judge(model: Any, tok: Any, task: quality_tasks.Task, args: argparse.Namespace) -> Any:
    """``--judge``: a function vector -> held-out success / fluent success (the quality benchmark's judge:
    greedy generations on the first ``--n-test`` test prompts, scored by the task's scorer and the fluency
    checks); without ``--judge``, a function returning ``{}``."""
    if not args.judge:
        return lambda vec, multiplier=1.0: {}
    ev = Evaluator(model, tok, task.test_prompts[: args.n_test], scorer=task.scorer, chat=task.chat,
                   max_new_tokens=args.max_new_tokens, fluency_lang=task.lang, neutral_prompts=None)
    ev.baseline()

    def judge(vec: Any, multiplier: float = 1.0) -> dict[str, Any]:
        s = ev.evaluate(vec, multiplier).summary
        return {"success": s["success_rate"], "fluent_success": s["fluent_success_rate"]}
    return judge


def run_task(model: Any, tok: Any, task: quality_tasks.Task, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    dp = task.datapoint(tok)
    ev = Evaluator(model, tok, task.test_prompts[: args.n_test], promote=[task.dst], suppress=[task.src],
                   chat=task.chat, generate=False)
    ev.baseline()
    judge = make_judge(model, tok, task, args)

    def one(name: str, kw: dict[str, Any]) -> dict[str, Any]:
        _sync(device)
        t = time.perf_counter()
        r = so.optimize(model, tok, [dp], args.layer, seed=0, progress=False, **kw)
        _sync(device)
        wall = time.perf_counter() - t
        vec = r.to_steering_vector()
        held = ev.evaluate(vec, 1.0).summary
        row = {"kind": "method", "task": task.name, "method": name, "steps": r.iters,
               "evals": r.evals, "status": r.status, "wall_s": round(wall, 2),
               "s_per_eval": round(wall / max(1, r.evals), 3),
               "start_loss": r.loss_history[0], "final_loss": r.loss, "norm": r.norm,
               "margin_gain": held.get("margin_gain"), "kl": held.get("kl"), **judge(vec)}
        if args.history:
            row["loss_history"] = [round(x, 3) for x in r.loss_history]
        emit(row)
        return row

    rows = [one("recipe (30 steps)", RECIPE)]
    target = rows[0]["final_loss"]
    rows.append(one("default (plateau stop)", {"lr": 0.1, "max_iters": 30}))
    for name, kw in METHODS.items():
        if args.methods and name.split()[0] not in args.methods.split(","):
            continue
        row = one(name, {**kw, "max_iters": args.max_steps, "target_loss": target, "plateau_patience": None})
        row["reached"] = row["status"] == "target_reached"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--tasks", default="all", help="comma-separated task names (benchmarks/quality_tasks.py)")
    ap.add_argument("--methods", default="", help="comma-separated optimisers to run (adam, adam_cosine, "
                                                  "normalized, lbfgs); default: all")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=45, help="step cap of each method")
    ap.add_argument("--n-test", type=int, default=12, help="held-out test prompts per task")
    ap.add_argument("--judge", action="store_true", help="also generate on the test prompts and report success and "
                                                          "fluent success (the quality benchmark's judge)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per test prompt (--judge)")
    ap.add_argument("--auto-kwargs", default="{}", help="auto_steer keyword arguments, as JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--history", action="store_true", help="include every method's loss history")
    ap.add_argument("--no-auto", action="store_true", help="skip auto_steer")
    ap.add_argument("--no-methods", action="store_true", help="skip the optimiser comparison")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up timings")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary: dict[str, Any] = {"kind": "summary", "device": args.device, "dtype": args.dtype,
                               "threads": torch.get_num_threads(), "layer": args.layer}
    if not args.no_startup:
        exe = Path(sys.executable)
        cli = exe.parent / ("steering-opt.exe" if os.name == "nt" else "steering-opt")
        summary["import_s_median5"] = round(_median_cmd([str(exe), "-c", "import steering_opt"]), 3)
        if cli.exists():
            summary["cli_help_s_median5"] = round(_median_cmd([str(cli), "--help"]), 3)
        emit({"kind": "startup", **{k: v for k, v in summary.items() if k.endswith("median5")}})
    model, tok = so.load_model(device=args.device, dtype=args.dtype)
    tasks = [t for t in quality_tasks.TASKS if args.tasks == "all" or t.name in args.tasks.split(",")]
    if not tasks:
        ap.error(f"--tasks: none of {args.tasks!r}; choose from {[t.name for t in quality_tasks.TASKS]}")
    rows: list[dict[str, Any]] = []
    autos: list[dict[str, Any]] = []
    for task in tasks:
        if not args.no_methods:
            rows += run_task(model, tok, task, args)
        if not args.no_auto:
            dp = task.datapoint(tok)
            t = time.perf_counter()
            vec, report = so.auto_steer(model, tok, [dp], seed=0, progress=False, **json.loads(args.auto_kwargs))
            wall = round(time.perf_counter() - t, 1)
            b = report.best or {}
            row = {"kind": "auto_steer", "task": task.name, "wall_s": wall, "auto_kwargs": args.auto_kwargs,
                   "layer": b.get("layer"), "variant": b.get("variant"), "multiplier": b.get("multiplier"),
                   "criterion": b.get("criterion"), "notes": report.notes,
                   **make_judge(model, tok, task, args)(vec)}
            emit(row)
            autos.append(row)
    summary["methods"] = rows
    summary["auto_steer"] = autos
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
