"""Quality benchmark: does one-shot steering change behaviour on prompts it never saw, fluently?

Usage::

    python benchmarks/bench_quality.py                       # all tasks -> benchmarks/quality.json + RESULTS.md
    python benchmarks/bench_quality.py --tasks refusal_induction --no-markdown

Tasks (benchmarks/quality_tasks.py): English→Spanish (the reference tutorial's datapoint), positive→negative
sentiment, a topic (weddings), refusal induction on harmless chat requests, a bulleted-list format (chat) and a
food topic. Each has ONE training datapoint and 24 held-out test prompts written for this benchmark
(``--n-prompts`` uses the first N). Methods, all on the embedded SmolLM2-135M-Instruct:

* ``none``: no steering; ``prompting``: an instruction in the prompt (plain tasks) or system message (chat);
* ``opt``: ``optimize_vector`` with the documented recipe (layer ``--layer``, lr 0.1, 30 steps), strength 1;
* ``opt+max_norm``: the same under a norm cap of ``--norm-fraction`` × the median residual norm at that layer;
* ``opt+clamp``: clamp steering (``vector_clamp=1``);
* ``opt+output_constr``: the recipe, then the output-constrained phase (minimum norm at the same loss);
* ``caa1`` / ``caa16``: contrastive mean difference (``train_steering_vector``, last token) from the same single
  pair / from 16 pairs, at the layer of ``opt``, strength chosen on the generic validation prompts (from
  0.25…4, by fluent success on 6 prompts) — a tuning step the optimised vectors do not get;
* ``ceiling``: the unsteered model with the behaviour induced directly (the task's target-language prompts, or
  its instruction plus forced first words, scored together with the generation): the "of ceiling" column is each
  method's fluent success over this row's;
* ``opt+kl``: the recipe plus ``kl_weight`` (λ from ``--kl-lambdas``, chosen by fluent success on
  ``--val-prompts`` generic validation prompts) on ``quality_tasks.KL_TRAIN_PROMPTS``;
* ``calibrated``: the ``opt`` vector at ``calibrate_strength(..., kl_budget=--kl-budget)`` on the same prompts;
* ``auto_steer``: ``steering_opt.auto_steer(model, tok, [datapoint], time_budget_s=--auto-budget)`` (its default
  log-prob signal on the built-in generic validation prompts; no scorer, no test prompt seen);
* ``auto_steer+scorer``: the same with ``scorer=`` the task's scorer (the best candidates judged by generating on
  the generic validation prompts).

Metrics on the test prompts (greedy, ``--max-new-tokens`` tokens): success rate (the task's scorer);
fluent-success rate (success AND distinct-2 ≥ 0.75 AND ≥ 95% of the words are words of the target language
in wordfreq's list); perplexity of the generated text under the unsteered model (given the plain prompt);
KL(unsteered ‖ steered) on neutral prompts (nats). Writes every generation to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import quality_tasks  # noqa: E402

import steering_opt as so  # noqa: E402
from steering_opt.compat.steering_vectors import train_steering_vector  # noqa: E402
from steering_opt.contrastive import ContrastPair  # noqa: E402
from steering_opt.evaluate import Evaluator, format_prompt, perplexity  # noqa: E402
from steering_opt.passes import generate_ids  # noqa: E402
from steering_opt.scorers import distinct_n, real_word_fraction  # noqa: E402
from steering_opt.sweep import GENERIC_CHAT_PROMPTS, GENERIC_PROMPTS, residual_norms  # noqa: E402

RECIPE = {"lr": 0.1, "max_iters": 30}
CAA_MULTIPLIERS = [0.25, 0.5, 1.0, 2.0, 4.0]


def _summary_row(name: str, res: Any, extra: dict[str, Any]) -> dict[str, Any]:
    s = res.summary
    return {"method": name, "success_rate": s.get("success_rate"), "fluent_success_rate": s.get("fluent_success_rate"),
            "perplexity": s.get("perplexity"), "kl": s.get("kl"), "distinct2": s.get("distinct2"),
            "real_words": s.get("real_words"), "margin_gain": s.get("margin_gain"), **extra,
            "outputs": [{"prompt": r["prompt"], "text": r["steered"], "success": r["success"],
                         "fluent": r["fluent"]} for r in res.records]}


def rescore(res: Any, texts: list[str], task: quality_tasks.Task) -> None:
    """Score ``texts`` (the forced first words + the generation) with the task's scorer and the evaluation's
    fluency rule (distinct-2 >= 0.75, >= 95% real words), in place of ``res``'s scores."""
    for r, text in zip(res.records, texts):
        r["steered"] = text
        r["success"] = task.scorer(text) >= 0.5
        r["fluent"] = distinct_n(text, 2) >= 0.75 and real_word_fraction(text, task.lang) >= 0.95
        r["fluent_success"] = bool(r["success"] and r["fluent"])
    n = max(len(res.records), 1)
    res.summary["success_rate"] = sum(r["success"] for r in res.records) / n
    res.summary["fluent_success_rate"] = sum(r["fluent_success"] for r in res.records) / n


def run_task(model: Any, tok: Any, task: quality_tasks.Task, args: argparse.Namespace) -> dict[str, Any]:
    t_task = time.perf_counter()
    layer = args.layer
    dp = task.datapoint(tok)
    ptxt = dp.prompt
    test_prompts = task.test_prompts[: args.n_prompts]
    ev = Evaluator(model, tok, test_prompts, scorer=task.scorer, promote=[task.dst], suppress=[task.src],
                   chat=task.chat, max_new_tokens=args.max_new_tokens, fluency_lang=task.lang)
    rows: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        print(f"[{task.name} {time.perf_counter() - t_task:6.1f}s] {msg}", flush=True)

    def want(name: str) -> bool:
        return args.methods == "all" or name in args.methods.split(",")

    if want("none"):
        res = ev.evaluate(None, label="none")
        rows.append(_summary_row("none", res, {}))
        log(f"none: success {res.summary['success_rate']:.2f}")

    # prompting baseline: the instruction is part of the prompt; perplexity is measured given the plain prompt
    instructed = [task.prompt_with_instruction(p) for p in test_prompts]
    if not want("prompting"):
        instructed = []
    if instructed:
        pev = Evaluator(model, tok, instructed, scorer=task.scorer, chat=False, max_new_tokens=args.max_new_tokens,
                        fluency_lang=task.lang, neutral_prompts=None)
        pres = pev.evaluate(None, label="prompting")
        ppl = perplexity(model, tok, test_prompts, [r["steered"] for r in pres.records], chat=task.chat)
        toks = [max(r.get("n_tokens", 0), 0) for r in pres.records]
        pooled = sum(t * math.log(p) for t, p in zip(toks, ppl) if t) / max(sum(toks), 1)
        pres.summary["perplexity"] = float(math.exp(pooled))
        pres.summary["kl"] = None
        rows.append(_summary_row("prompting", pres, {}))
        log(f"prompting: success {pres.summary['success_rate']:.2f}")

    if want("ceiling"):  # the unsteered model with the behaviour induced directly (see quality_tasks.Task)
        inputs = task.ceiling_inputs(args.n_prompts)
        texts = [format_prompt(tok, p, chat=task.chat and not isinstance(p, str)) + pre for p, pre in inputs]
        cev = Evaluator(model, tok, texts, scorer=None, chat=False, max_new_tokens=args.max_new_tokens,
                        fluency_lang=task.lang, neutral_prompts=None)
        cres = cev.evaluate(None, label="ceiling")
        # the evaluation strips each generation; the forced words need it as generated (" was" after "The bride")
        raw = [tok.decode(x, skip_special_tokens=True) for x in generate_ids(model, tok, cev.prompt_ids,
                                                                             **cev.gen_kwargs)]
        pre_texts = [(pre + g).strip() for (_, pre), g in zip(inputs, raw)]
        rescore(cres, pre_texts, task)
        ppl = perplexity(model, tok, test_prompts, pre_texts, chat=task.chat)
        toks = [max(r.get("n_tokens", 0), 0) for r in cres.records]
        pooled = sum(t * math.log(p) for t, p in zip(toks, ppl) if t) / max(sum(toks), 1)
        cres.summary["perplexity"] = float(math.exp(pooled))
        cres.summary["kl"] = None
        how = "target-language prompts" if task.ceiling_prompts is not None else \
            f"instruction + forced first words {task.ceiling_prefix!r}"
        rows.append(_summary_row("ceiling", cres, {"notes": how}))
        log(f"ceiling: success {cres.summary['success_rate']:.2f}, fluent {cres.summary['fluent_success_rate']:.2f}")

    # optimised vectors
    cap = args.norm_fraction * residual_norms(model, tok, list(GENERIC_CHAT_PROMPTS if task.chat else
                                                               GENERIC_PROMPTS)[:4], [layer], chat=task.chat)[layer]
    variants = [("opt", {}), (f"opt+max_norm={cap:.0f}", {"max_norm": cap}), ("opt+clamp=1", {"vector_clamp": 1.0}),
                ("opt+output_constr", {"do_output_constr": True, "max_output_constr_iters": 30})]
    opt_norm = None
    opt_vec = None
    for name, kw in variants:
        if not want(name.split("=")[0]):
            continue
        t0 = time.perf_counter()
        v, info = so.optimize_vector(model, [dp], layer, tokenizer=tok, seed=0, **RECIPE, **kw)
        build = time.perf_counter() - t0
        vec = so.SteeringVector.from_optimization(v, info, layer, clamp=kw.get("vector_clamp"))
        res = ev.evaluate(vec, label=name)
        if name == "opt":
            opt_vec = vec
        opt_norm = opt_norm or info["norm"]
        rows.append(_summary_row(name, res, {"layer": layer, "norm": info["norm"], "train_loss": info["loss"],
                                             "build_s": build}))
        log(f"{name}: loss {info['loss']:.2f}, norm {info['norm']:.1f}, success {res.summary['success_rate']:.2f}, "
            f"fluent {res.summary['fluent_success_rate']:.2f}")

    # opt+kl: the recipe plus the KL term on held-out neutral prompts; lambda chosen on the generic validation
    # prompts (fluent success, ties: lower KL), never on the test prompts
    # (chat tasks: the neutral prompts as user turns, as the KL column measures them)
    kl_prompts = tuple(format_prompt(tok, p, chat=task.chat) for p in quality_tasks.KL_TRAIN_PROMPTS)
    if want("opt+kl"):
        t0 = time.perf_counter()
        val = Evaluator(model, tok, list(GENERIC_CHAT_PROMPTS if task.chat else GENERIC_PROMPTS)[:args.val_prompts],
                        scorer=task.scorer, chat=task.chat, max_new_tokens=24, fluency_lang=task.lang,
                        neutral_prompts=None)
        best: Any = None
        tried = []
        for lam in [float(x) for x in args.kl_lambdas.split(",")]:
            fit = so.optimize(model, tok, [dp], layer, seed=0, kl_weight=lam,
                              kl_prompts=kl_prompts, progress=False, **RECIPE)
            info, cand = fit.info, fit.to_steering_vector()
            fs = val.evaluate(cand, label=f"kl={lam:g}").summary["fluent_success_rate"]
            tried.append((lam, fs, info["kl"]))
            log(f"opt+kl validation: lambda {lam:g}: fluent {fs:.2f}, train KL {info['kl']:.2f}")
            if best is None or (fs, -info["kl"]) > (best[1], -best[2]["kl"]):
                best = (lam, fs, info, cand)
        lam, _, info, vec = best
        build = time.perf_counter() - t0
        res = ev.evaluate(vec, label="opt+kl")
        rows.append(_summary_row("opt+kl", res, {"layer": layer, "norm": info["norm"], "train_loss": info["loss"],
                                                 "kl_weight": lam, "train_kl": info["kl"], "build_s": build,
                                                 "validation": tried}))
        log(f"opt+kl: lambda {lam:g}, loss {info['loss']:.2f}, success {res.summary['success_rate']:.2f}, "
            f"fluent {res.summary['fluent_success_rate']:.2f}")

    # calibrated: the opt vector at the strength whose KL on held-out neutral prompts is --kl-budget
    if want("calibrated") and opt_vec is not None:
        t0 = time.perf_counter()
        try:
            mult = so.calibrate_strength(model, tok, opt_vec, args.kl_budget, kl_prompts)
        except ValueError as e:
            log(f"calibrated: {e}")
            mult = None
        if mult is not None:
            build = time.perf_counter() - t0
            res = ev.evaluate(opt_vec, mult, label="calibrated")
            rows.append(_summary_row("calibrated", res, {"layer": layer, "multiplier": mult, "build_s": build,
                                                         "kl_budget": args.kl_budget,
                                                         "norm": float(opt_vec.layer_activations[layer].norm())}))
            log(f"calibrated: x{mult:.3g}, success {res.summary['success_rate']:.2f}, "
                f"fluent {res.summary['fluent_success_rate']:.2f}")

    # CAA from the same pair and from 16 pairs, strength tuned on the generic validation prompts
    def text(prompt: str, completion: str) -> str:
        return format_prompt(tok, prompt, chat=task.chat) + (completion.lstrip() if task.chat else completion)

    caa_sets = {"caa1": [ContrastPair(ptxt + task.dst, ptxt + task.src)],
                "caa16": [ContrastPair(text(p, pos), text(p, neg)) for p, pos, neg in task.pairs]}
    for name, pairs in caa_sets.items():
        if not want(name):
            continue
        t0 = time.perf_counter()
        # steering-vectors' decoder_block layer L (block L's output) is steering_opt's layer L + 1 (its input)
        vec = train_steering_vector(model, tok, pairs, layers=[layer], read_token_index=-1).to_steering_opt(model)
        tuned = so.sweep(model, tok, [dp], layers=[layer + 1], multipliers=CAA_MULTIPLIERS,
                         method=lambda m, t, tr, lay, _v=vec, **o: _v,
                         validation_prompts=list(GENERIC_CHAT_PROMPTS if task.chat else GENERIC_PROMPTS)[:6],
                         chat=task.chat, scorer=task.scorer, max_new_tokens=24, neutral_prompts=None)
        mult = tuned.best["multiplier"]
        build = time.perf_counter() - t0
        res = ev.evaluate(vec, mult, label=name)
        rows.append(_summary_row(name, res, {"layer": layer, "norm": float(vec.layer_activations[layer + 1].norm()),
                                             "multiplier": mult, "build_s": build,
                                             "validation": [(r["multiplier"], r["fluent_success_rate"])
                                                            for r in tuned.table]}))
        log(f"{name}: norm {rows[-1]['norm']:.1f}, x{mult:g}, success {res.summary['success_rate']:.2f}, "
            f"fluent {res.summary['fluent_success_rate']:.2f}")

    # auto_steer: the one call; default log-prob signal (no scorer) and with the task's scorer. Either way it
    # measures only on its built-in generic validation prompts, never on the test prompts.
    for name, scorer, budget in (("auto_steer", None, args.auto_budget),
                                 ("auto_steer+scorer", task.scorer, args.auto_budget_scored)):
        if not want(name):
            continue
        t0 = time.perf_counter()
        vec, report = so.auto_steer(model, tok, [dp], scorer=scorer, time_budget_s=budget, seed=0, progress=False)
        build = time.perf_counter() - t0
        res = ev.evaluate(vec, label=name)
        b = report.best
        rows.append(_summary_row(name, res, {"layer": b["layer"], "variant": b["variant"],
                                             "multiplier": b["multiplier"],
                                             "norm": float(vec.layer_activations[b["layer"]].norm()),
                                             "build_s": build, "notes": report.notes,
                                             "validation": [{k: r.get(k) for k in (
                                                 "layer", "variant", "multiplier", "criterion", "margin_gain", "kl",
                                                 "fluent_success_rate")} for r in report.table]}))
        log(f"{name}: layer {b['layer']} {b['variant']} x{b['multiplier']:g} in {build:.0f}s, "
            f"success {res.summary['success_rate']:.2f}, fluent {res.summary['fluent_success_rate']:.2f}")
    return {"task": task.name, "chat": task.chat, "train_prompt": task.prompt, "src": task.src, "dst": task.dst,
            "n_test_prompts": len(test_prompts), "layer": layer, "time_s": time.perf_counter() - t_task,
            "methods": rows}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def markdown(doc: dict[str, Any]) -> str:
    out = []
    for t in doc["tasks"]:
        out.append(f"### {t['task']} ({t['n_test_prompts']} held-out prompts, layer {t['layer']}, "
                   f"{t['time_s'] / 60:.1f} min)\n")
        out.append("| method | success | fluent success | of ceiling | perplexity | KL (nats) | ‖v‖ | notes |")
        out.append("|---|---|---|---|---|---|---|---|")
        ceil = next((r["fluent_success_rate"] for r in t["methods"] if r["method"] == "ceiling"), None)
        for r in t["methods"]:
            frac = None if not ceil or r["fluent_success_rate"] is None else r["fluent_success_rate"] / ceil
            notes = []
            if r["method"] == "ceiling" and r.get("notes"):
                notes.append(str(r["notes"]))
            if r.get("kl_weight") is not None:
                notes.append(f"λ={r['kl_weight']:g} (validation)")
            if r.get("kl_budget") is not None:
                notes.append(f"budget {r['kl_budget']:g} nats")
            if r.get("multiplier") is not None:
                notes.append(f"×{r['multiplier']:g}")
            if r.get("variant"):
                notes.append(f"layer {r['layer']}, {r['variant']}, chosen in {r['build_s']:.0f} s")
            if r.get("train_loss") is not None:
                notes.append(f"train loss {r['train_loss']:.1f}")
            out.append(f"| {r['method']} | {_fmt(r['success_rate'], True)} | {_fmt(r['fluent_success_rate'], True)} | "
                       f"{_fmt(frac, True)} | {_fmt(r['perplexity'])} | {_fmt(r['kl'])} | {_fmt(r.get('norm'))} | "
                       f"{', '.join(notes)} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="all", help="comma-separated task names (default: all)")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--norm-fraction", type=float, default=0.25)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--auto-budget", type=float, default=150.0, help="auto_steer time budget (s)")
    ap.add_argument("--auto-budget-scored", type=float, default=200.0, help="auto_steer+scorer time budget (s)")
    ap.add_argument("--methods", default="all", help="comma-separated methods (none, prompting, opt, opt+max_norm, "
                    "opt+clamp, opt+output_constr, opt+kl, calibrated, ceiling, caa1, caa16, auto_steer, "
                    "auto_steer+scorer); default: all")
    ap.add_argument("--n-prompts", type=int, default=24, help="test prompts per task (the first N of 24)")
    ap.add_argument("--kl-lambdas", default="1,10", help="opt+kl: kl_weight candidates (chosen on validation)")
    ap.add_argument("--val-prompts", type=int, default=4, help="opt+kl: generic validation prompts per candidate")
    ap.add_argument("--kl-budget", type=float, default=0.3, help="calibrated: KL budget (nats)")
    ap.add_argument("--merge", action="store_true", help="add the rows to those already in --out (same tasks)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--out", default=str(ROOT / "quality.json"))
    ap.add_argument("--no-markdown", action="store_true", help="do not rewrite the table in RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [t.name for t in quality_tasks.TASKS]
    wanted = names if args.tasks == "all" else [x.strip() for x in args.tasks.split(",")]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        ap.error(f"unknown task(s) {unknown}; known: {names}")
    model, tok = so.load_model()
    start = time.perf_counter()
    doc: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (embedded, float32, CPU)", "threads": args.threads,
                           "machine": platform.platform(), "torch": torch.__version__, "args": vars(args),
                           "tasks": []}
    old = json.loads(Path(args.out).read_text(encoding="utf-8")) if args.merge and Path(args.out).exists() else None
    if old is not None:
        doc = old
    for task in quality_tasks.TASKS:
        if task.name in wanted:
            result = run_task(model, tok, task, args)
            prev = next((t for t in doc["tasks"] if t["task"] == task.name), None)
            if prev is None:
                doc["tasks"].append(result)
            else:
                new_rows = {r["method"]: r for r in result["methods"]}  # a re-run row keeps its place
                prev["methods"] = [new_rows.pop(r["method"], r) for r in prev["methods"]] + list(new_rows.values())
                prev["time_s"] += result["time_s"]
            Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    doc["time_s"] = doc.get("time_s", 0.0) * (old is not None) + time.perf_counter() - start
    Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    table = markdown(doc)
    print(table)
    if not args.no_markdown:
        path = ROOT / "RESULTS.md"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        begin, end = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
        block = f"{begin}\n{table}\n{end}"
        if begin in text and end in text:
            text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text + ("\n" if text else "") + block + "\n"
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
