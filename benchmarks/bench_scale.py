"""Scale benchmarks: many jobs per pass (optimize_many) and data-parallel processes.

Usage::

    python benchmarks/bench_scale.py                       # CPU, float32, embedded model, 1 thread/process
    python benchmarks/bench_scale.py --ks 1,4 --skip-dp    # quicker
    python benchmarks/bench_scale.py --device cuda         # jobs part on a GPU (data-parallel part: gloo, CPU)

(a) Jobs: K = 1, 4, 12, 24 copies of the tutorial datapoint (``workloads.tutorial()``, one src and one
dst completion) at one layer, different seeds, ``max_iters`` steps each. "one by one": K separate
``optimize_vector`` calls; "batched": one ``optimize_many`` call. Seconds per job-step = wall time of
the whole call(s) / (K × max_iters) — set-up and the final evaluation included, as a user sees it.
The batched vectors are compared with the one-by-one vectors (``max_rel_diff``). For context each row
also gives the arithmetic of one job-step (``gmac_per_job_step``: 10⁹ multiply-accumulates of the
forward and input-gradient backward of blocks >= layer and of the LM head), the rate both ways
achieve, and the machine's float32 matrix-product rate measured just before (``matmul_gmac_per_s``):
when one job alone already runs near that rate, batching cannot be much faster.

(b) Data parallel: ``optimize_vector_minibatch_hf`` over the 8 prompts of ``workloads.PROMPTS`` with the
tutorial's completions (one minibatch of 8) at the same layer, run by 1 process and by 2 processes
(gloo on 127.0.0.1, started like ``torchrun`` would, one thread each). Seconds per step = wall time of
the call on rank 0 / max_iters (model loading and imports excluded); the 2-process vector is compared
with the 1-process one.

Prints one JSON object per measurement, then a summary object. On a CPU a single tutorial job already
keeps a core's matrix units busy, so batching removes only per-pass overhead there; on a GPU one small
job leaves the device mostly idle and batching is where the time goes. The loads of other users of the
machine are reported (``loadavg``) because they move CPU timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads  # noqa: E402

import steering_opt as so  # noqa: E402
from steering_opt.data import tokenize_datapoints  # noqa: E402
from steering_opt.scale import Job, optimize_many  # noqa: E402


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def job_step_gmac(model: Any, tok: Any, layer: int) -> float:
    """Multiply-accumulates (×1e9) of one optimiser step of one tutorial job: forward + input-gradient
    backward (≈ 2 × forward; the weights are frozen) of blocks >= ``layer`` over the packed prompt and
    completions, and of the LM head at the completion positions."""
    seqs = tokenize_datapoints(tok, workloads.tutorial())
    comp = sum(s.completion_len for s in seqs)
    tokens = seqs[0].prompt_len + comp
    cfg = model.config
    d, ff, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) * (d // heads)
    per_token = d * d + 2 * d * kv + d * d + 3 * d * ff + 2 * tokens * d  # projections, MLP, attention
    fwd = (n - layer) * tokens * per_token + comp * cfg.vocab_size * d
    return 2 * fwd / 1e9


def matmul_gmacs_per_s(d: int, ff: int, device: str) -> float:
    """Best of a few (512 × d) @ (d × ff) float32 products: this machine's matrix throughput."""
    x, w = torch.randn(512, d, device=device), torch.randn(d, ff, device=device)
    best = math.inf
    for _ in range(12):
        t0 = time.perf_counter()
        x @ w
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 512 * d * ff / best / 1e9


def bench_jobs(model: Any, tok: Any, k: int, layer: int, iters: int) -> dict[str, Any]:
    """Seconds per job-step for ``k`` tutorial jobs, one by one and batched."""
    jobs = [Job(workloads.tutorial(), layer, lr=0.1, max_iters=iters, seed=s) for s in range(k)]
    t0 = time.perf_counter()
    separate = [so.optimize_vector(model, list(j.datapoints), j.layer, tokenizer=tok, **j.kwargs()) for j in jobs]
    t_sep = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = optimize_many(model, jobs, tokenizer=tok)
    t_bat = time.perf_counter() - t0
    diff = max(float((b[0] - s[0]).norm() / s[0].norm()) for b, s in zip(batched, separate))
    assert all(b[-1]["iters"] == s[-1]["iters"] == iters for b, s in zip(batched, separate))
    steps = k * iters
    return {"part": "jobs", "K": k, "layer": layer, "max_iters": iters,
            "one_by_one_s_per_job_step": round(t_sep / steps, 4), "batched_s_per_job_step": round(t_bat / steps, 4),
            "speedup": round(t_sep / t_bat, 2), "one_by_one_total_s": round(t_sep, 2),
            "batched_total_s": round(t_bat, 2), "max_rel_diff": float(f"{diff:.2e}"), "loadavg": _loadavg()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_dp(nprocs: int, layer: int, iters: int, timeout: float) -> dict[str, Any]:
    """Run the minibatch workload in ``nprocs`` fresh processes; rank 0's timing and vector."""
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        procs = []
        for rank in range(nprocs):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--dp-worker", tmp, "--layer", str(layer), "--dp-iters", str(iters)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"data-parallel benchmark with {nprocs} processes exceeded {timeout} s") from None
        for rank, (p, out) in enumerate(zip(procs, outs)):
            if p.returncode != 0:
                raise RuntimeError(f"data-parallel benchmark: rank {rank} exited with {p.returncode}:\n{out[-3000:]}")
        res = json.loads(Path(tmp, "rank0.json").read_text())
        res["vector"] = torch.load(Path(tmp, "rank0.pt"))
        return res


def dp_worker(out: str, layer: int, iters: int) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model, tok = so.load_model(dtype="float32")
    distributed = False
    if world > 1:
        from steering_opt.parallel import init_distributed

        init_distributed("gloo", timeout=300)
        distributed = True
    kw = dict(lr=0.1, max_iters=iters, seed=0, distributed=distributed)
    t0 = time.perf_counter()
    vec, info = so.optimize_vector_minibatch_hf(model, tok, workloads.PROMPTS, layer, [workloads.EN], [workloads.ES],
                                                minibatch_size=len(workloads.PROMPTS), **kw)
    wall = time.perf_counter() - t0
    if rank == 0:
        Path(out, "rank0.json").write_text(json.dumps({"wall_s": wall, "iters": info["iters"]}))
        torch.save(vec, Path(out, "rank0.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--iters", type=int, default=3, help="max_iters of every job")
    ap.add_argument("--ks", default="1,4,12,24", help="comma-separated numbers of jobs")
    ap.add_argument("--dp-iters", type=int, default=4, help="max_iters of the data-parallel workload")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the jobs part")
    ap.add_argument("--dp-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dp_worker:
        dp_worker(args.dp_worker, args.layer, args.dp_iters)
        return 0
    torch.set_num_threads(args.threads)
    model, tok = so.load_model(device=args.device, dtype=args.dtype)
    so.optimize_vector(model, workloads.tutorial(), args.layer, tokenizer=tok, max_iters=1, seed=0)  # warm-up
    gmac = job_step_gmac(model, tok, args.layer)
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        peak = matmul_gmacs_per_s(model.config.hidden_size, model.config.intermediate_size, args.device)
        row = bench_jobs(model, tok, k, args.layer, args.iters)
        row.update(device=args.device, dtype=args.dtype, threads=torch.get_num_threads(),
                   gmac_per_job_step=round(gmac, 2), matmul_gmac_per_s=round(peak, 1),
                   one_by_one_gmac_per_s=round(gmac / row["one_by_one_s_per_job_step"], 1),
                   batched_gmac_per_s=round(gmac / row["batched_s_per_job_step"], 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    dp_rows = []
    if not args.skip_dp:
        del model
        ref = None
        for n in (1, 2):
            res = bench_dp(n, args.layer, args.dp_iters, timeout=1800)
            row = {"part": "data_parallel", "processes": n, "prompts": len(workloads.PROMPTS), "layer": args.layer,
                   "max_iters": args.dp_iters, "s_per_step": round(res["wall_s"] / args.dp_iters, 4),
                   "threads_per_process": 1, "loadavg": _loadavg()}
            if ref is None:
                ref = res
            else:
                row["speedup_vs_1"] = round(ref["wall_s"] / res["wall_s"], 2)
                diff = float((res["vector"] - ref["vector"]).norm() / ref["vector"].norm())
                row["rel_diff_vs_1"] = float(f"{diff:.2e}")
            print(json.dumps(row), flush=True)
            dp_rows.append(row)
    summary: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__}
    for r in rows:
        summary[f"jobs_speedup_K{r['K']}"] = r["speedup"]
    if dp_rows:
        summary["dp_speedup_2_vs_1"] = dp_rows[-1].get("speedup_vs_1")
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
