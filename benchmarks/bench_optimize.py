"""Seconds per optimisation step: fast engine vs the naive reference algorithm vs the floor.

Usage::

    python benchmarks/bench_optimize.py                      # CPU, float32, embedded model
    python benchmarks/bench_optimize.py --device cuda --dtype bfloat16

Workloads (embedded SmolLM2-135M unless --model): (a) the tutorial datapoint at layers 5, 10, 20;
(b) one prompt with 8 completions (4 src, 4 dst) at layer 10; (c) 8 datapoints × 2 completions at
layer 10; (d) ``optimize_vectors`` over 6 layers (5, 7, 9, 11, 13, 15).

For each: median seconds per step (forward + backward + Adam step, after warm-up) for both engines,
measured in the same run, their ratio, the memory held for backward (bytes of tensors autograd saves
in one step; plus CUDA peak allocation on GPU), and the floor: one bare forward+backward of blocks
≥ L over the unique tokens (each prompt once, plus its completions), without the LM head, and the same
floor plus the LM head and log-softmax at the positions that predict a completion token (work any
exact algorithm must do).
Prints one JSON object per workload, then a summary object.
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

import workloads  # noqa: E402

import steering_opt as so  # noqa: E402
from steering_opt import arch  # noqa: E402
from steering_opt.data import tokenize_datapoints  # noqa: E402
from steering_opt.engine import Objective, make_engine  # noqa: E402
from steering_opt.hooks import frozen_model  # noqa: E402
from steering_opt.loop import JobState, spec_for  # noqa: E402
from steering_opt.options import OptimizeOptions  # noqa: E402
from steering_opt.parameterization import Additive  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(model: Any, tok: Any, dps: list, layers: list[int], engine: str, *, per_layer: bool,
                steps: int, warmup: int) -> dict[str, Any]:
    """Median seconds per optimiser step of ``engine`` on ``dps`` steering ``layers``: the engine's loss and
    gradients through the optimiser's own per-row steering (:func:`steering_opt.loop.spec_for`), then an Adam step
    (the stopping checks and snapshots of :func:`steering_opt.loop.run_jobs` are left out)."""
    device = next(model.parameters()).device
    seqs = tokenize_datapoints(tok, dps)
    d = arch.hidden_size(model)
    gen = torch.Generator().manual_seed(0)
    if per_layer:
        steering = {x: Additive(torch.randn(d, generator=gen).to(device).requires_grad_(True)) for x in layers}
    else:
        shared = Additive(torch.randn(d, generator=gen).to(device).requires_grad_(True))
        steering = {x: shared for x in layers}  # one vector for every layer, as optimize() does
    state = JobState(steering, seqs, len(dps), OptimizeOptions(lr=0.01), gen)
    seq_job = torch.zeros(len(seqs), dtype=torch.long)  # every sequence belongs to the one job
    eng = make_engine(engine, model, seqs, layers, Objective())
    opt = torch.optim.Adam(state.tensors, lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        eng.run(spec_for([state], layers, seq_job, state.signs, None))  # built each round, as run_jobs does
        opt.step()

    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"s_per_step": statistics.median(times[warmup:]), "saved_mb": workloads.saved_bytes(step, model) / 2**20}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def time_floor(model: Any, tok: Any, dps: list, low: int, *, steps: int, warmup: int) -> dict[str, Any]:
    """Forward+backward of blocks >= low over the unique tokens (no LM head): the arithmetic floor."""
    device = next(model.parameters()).device
    rows, heads = [], []
    for b, dp in enumerate(dps):
        ids = list(tok(dp.prompt)["input_ids"])
        for c in dp.src_completions + dp.dst_completions:
            c_ids = list(tok(c, add_special_tokens=False)["input_ids"])
            heads += [(b, len(ids) + t - 1) for t in range(len(c_ids))]  # one logit row per completion token
            ids += c_ids
        rows.append(ids)
    hb = torch.tensor([b for b, _ in heads], device=device)
    ht = torch.tensor([t for _, t in heads], device=device)
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
    input_ids = input_ids.to(device)
    block = arch.get_site_module(model, low)
    decoder = model.get_decoder()
    captured: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        captured["h"] = arch.get_hidden_states(args, kwargs).detach()

    with torch.no_grad():
        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        decoder(input_ids=input_ids, use_cache=False)
        handle.remove()
    v = torch.zeros(captured["h"].shape[-1], device=device, requires_grad=True)

    def replace(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return arch.replace_hidden_states(args, kwargs, captured["h"] + v)

    head = model.get_output_embeddings()
    times: dict[bool, list[float]] = {False: [], True: []}
    handle = block.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        with arch.truncated_blocks(model, low):
            for with_head in (False, True):
                for _ in range(warmup + steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    out = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
                    loss = out.float().sum()
                    if with_head:  # + the LM head and a log-softmax at the positions that predict completions
                        loss = loss + torch.log_softmax(head(out[hb, ht]).float(), -1)[:, 0].sum()
                    loss.backward()
                    _sync(device)
                    times[with_head].append(time.perf_counter() - t0)
    finally:
        handle.remove()
    return {"s_per_step": statistics.median(times[False][warmup:]),
            "with_head_s_per_step": statistics.median(times[True][warmup:]),
            "unique_tokens": sum(len(r) for r in rows), "logit_positions": len(heads)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF id or path (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workloads", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = so.load_model(args.model, device=args.device, dtype=args.dtype)
    cases = []
    wanted = set(args.workloads.split(","))
    if "a" in wanted:
        cases += [(f"a_tutorial_L{L}", workloads.tutorial(), [L], False) for L in (5, 10, 20)]
    if "b" in wanted:
        cases.append(("b_1prompt_8completions_L10", workloads.many_completions(), [10], False))
    if "c" in wanted:
        cases.append(("c_8datapoints_L10", workloads.many_datapoints(), [10], False))
    if "d" in wanted:
        cases.append(("d_optimize_vectors_6layers", workloads.tutorial(), [5, 7, 9, 11, 13, 15], True))
    results = []
    with frozen_model(model):
        for name, dps, layers, per_layer in cases:
            ref = time_engine(model, tok, dps, layers, "reference", per_layer=per_layer, steps=args.steps,
                              warmup=args.warmup)
            fast = time_engine(model, tok, dps, layers, "fast", per_layer=per_layer, steps=args.steps,
                               warmup=args.warmup)
            floor = time_floor(model, tok, dps, min(layers), steps=args.steps, warmup=args.warmup)
            row = {
                "workload": name, "layers": layers, "device": args.device, "dtype": args.dtype,
                "reference_s_per_step": round(ref["s_per_step"], 4), "fast_s_per_step": round(fast["s_per_step"], 4),
                "floor_s_per_step": round(floor["s_per_step"], 4),
                "speedup_vs_reference": round(ref["s_per_step"] / fast["s_per_step"], 2),
                "fast_over_floor": round(fast["s_per_step"] / floor["s_per_step"], 2),
                "floor_with_head_s_per_step": round(floor["with_head_s_per_step"], 4),
                "fast_over_floor_with_head": round(fast["s_per_step"] / floor["with_head_s_per_step"], 2),
                "reference_saved_mb": round(ref["saved_mb"], 1), "fast_saved_mb": round(fast["saved_mb"], 1),
                "unique_tokens": floor["unique_tokens"], "logit_positions": floor["logit_positions"],
            }
            for k in ("cuda_peak_mb",):
                if k in ref:
                    row["reference_" + k] = round(ref[k], 1)
                    row["fast_" + k] = round(fast[k], 1)
            print(json.dumps(row), flush=True)
            results.append(row)
    print(json.dumps({"summary": {
        "torch_threads": torch.get_num_threads(),
        "min_speedup": min(r["speedup_vs_reference"] for r in results),
        "max_fast_over_floor": max(r["fast_over_floor"] for r in results),
        "max_fast_over_floor_with_head": max(r["fast_over_floor_with_head"] for r in results),
    }}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
