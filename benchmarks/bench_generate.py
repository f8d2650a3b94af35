"""Cost of steering hooks during ``generate`` (KV cache): steered vs unsteered time.

Usage::

    python benchmarks/bench_generate.py [--new-tokens 64] [--repeats 5] [--device cuda --dtype bfloat16]

Greedy generation of ``--new-tokens`` tokens from a chat prompt, alternating unsteered and steered runs
(additive, clamp and rank-2 affine hooks at layer 10; with and without a ``token`` restriction), median
over ``--repeats``. Prints one JSON object per kind and a summary with the worst steered/unsteered ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import steering_opt as so


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer", type=int, default=10)
    args = ap.parse_args(argv)
    model, tok = so.load_model(args.model, device=args.device, dtype=args.dtype)
    dev = next(model.parameters()).device
    d = so.hidden_size(model)
    gen = torch.Generator().manual_seed(0)
    v = (torch.randn(d, generator=gen) * 4).to(dev)
    L = (torch.randn(2, d, generator=gen) * 0.01).to(dev)
    R = (torch.randn(2, d, generator=gen) * 0.01).to(dev)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the moon."}], tokenize=False,
                                     add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt").to(dev)
    kinds = {
        "additive": so.make_steering_hook_hf(v),
        "additive_token_slice": so.make_steering_hook_hf(v, token=slice(-3, None)),
        "clamp": so.make_steering_hook_hf(2 * v, so.make_abl_mat(v)),
        "affine_rank2": so.make_steering_hook_hf(v, (L, R)),
    }

    def run(hooks: list) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with so.hf_hooks_contextmanager(model, hooks), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == inputs["input_ids"].shape[1] + args.new_tokens
        return time.perf_counter() - t0

    run([])  # warm-up
    rows = []
    for name, hook in kinds.items():
        base, steered = [], []
        for _ in range(args.repeats):
            base.append(run([]))
            steered.append(run([(args.layer, hook)]))
        row = {"kind": name, "new_tokens": args.new_tokens, "unsteered_s": round(statistics.median(base), 4),
               "steered_s": round(statistics.median(steered), 4)}
        row["ratio"] = round(row["steered_s"] / row["unsteered_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"summary": {"max_ratio": max(r["ratio"] for r in rows), "device": args.device,
                                  "dtype": args.dtype}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
