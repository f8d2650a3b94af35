"""Record llm-steering-opt's numbers for tests/test_compat_reference_optimize.py.

Runs the reference library (llm-steering-opt's ``steering_opt.py``, imported from a checkout under a
private module name; it is never copied into this project) on the embedded SmolLM2-135M model and writes
small summaries to ``tests/data/llm_steering_opt_reference.json``: the signatures of its optimiser
functions, losses at a fixed vector, optimisation trajectories (additive, affine, noise, anti-PGD noise,
satisficing) and the minibatch loss. The test reads only the JSON; the JSON names the reference commit.

Usage::

    python tools/record_reference_numbers.py --reference PATH [--out FILE] [--compare]

``PATH``: a directory holding the reference's ``steering_opt.py``, or a git repository (bare or not) of
https://github.com/jacobdunefsky/llm-steering-opt (its ``HEAD`` is used). The reference imports ``mdmm``
at module level (used only by its output-constrained phase, which is not run here); when it is not
installed an empty stand-in module is provided. The reference hard-codes ``.cuda()`` on its random start;
on a machine without CUDA that call is made a no-op while the reference runs. ``--compare`` also runs
this package on the same cases and prints the largest differences.

Comparison conventions (see docs/differences-llm-steering-opt.md): the reference puts ``eps`` inside the
log (``-log(p + eps)``); trajectories are recorded with ``eps=0`` so both minimise the same loss. The
reference takes ``max_iters + 1`` steps: its run with ``max_iters=N-1`` is compared with ours with
``max_iters=N``. Vectors are summarised by their norm, first coordinates and projections on seeded probes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

LAYER = 10
N_STEPS = 4
N_COORDS = 12
PROBE_SEED = 1234
START_SEED = 0
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "llm_steering_opt_reference.json"

#: The datapoints of every case: prompt, src completions, dst completions (clean token boundaries: the
#: prompt + completion tokenises to the prompt's tokens followed by the completion's).
CASES: dict[str, list[tuple[str, list[str], list[str]]]] = {
    "two_completions": [("The cat sat on the", [" roof"], [" mat"])],
    "one_per_datapoint": [("The cat sat on the", [], [" mat"]), ("The dog slept on the", [" roof"], [])],
    "one": [("The cat sat on the", [], [" mat"])],
}
MINIBATCH_PROMPTS = ["The cat sat on the", "The dog sat on the", "A cat slept on the", "The bird sat on the"]
MINIBATCH_COMPLETIONS = ([" roof"], [" mat"])


def load_reference(path: Path) -> tuple[types.ModuleType, str]:
    """The reference module (as ``llm_steering_opt_reference``) and its commit (or "unknown")."""
    src = path / "steering_opt.py"
    commit = "unknown"
    tmp = Path(tempfile.mkdtemp(prefix="llm_steering_opt_ref_"))
    if not src.exists():
        text = subprocess.run(["git", "-C", str(path), "show", "HEAD:steering_opt.py"], check=True,
                              capture_output=True, text=True).stdout
        src = tmp / "steering_opt.py"
        src.write_text(text)
    with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
    if importlib.util.find_spec("mdmm") is None:
        (tmp / "mdmm.py").write_text('"""Stand-in: the output-constrained phase is not run."""\n')
    sys.path.insert(0, str(tmp))
    try:
        spec = importlib.util.spec_from_file_location("llm_steering_opt_reference", src)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(tmp))
    return mod, commit


@contextlib.contextmanager
def cuda_is_a_no_op() -> Iterator[None]:
    real = torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = real  # type: ignore[method-assign]


def summary(t: torch.Tensor) -> dict[str, Any]:
    """Norm, first coordinates and projections on two seeded probes of a tensor (flattened, float64)."""
    x = torch.as_tensor(t).detach().double().flatten()
    g = torch.Generator().manual_seed(PROBE_SEED)
    probes = torch.randn(2, x.numel(), generator=g, dtype=torch.float64)
    return {"norm": float(x.norm()), "head": [float(v) for v in x[:N_COORDS]],
            "probes": [float(v) for v in probes @ x]}


def start_vector(d: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(START_SEED)) * 2


def signature(fn: Any) -> list[list[Any]]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        default = None if p.default is inspect.Parameter.empty else p.default
        out.append([p.name, default if isinstance(default, (int, float, str, bool, type(None))) else repr(default)])
    return out


def datapoints(module: Any, case: str) -> list[Any]:
    return [module.TrainingDatapoint(p, src_completions=list(s), dst_completions=list(d)) for p, s, d in CASES[case]]


def check_boundaries(tok: Any) -> None:
    for case in CASES.values():
        for prompt, src, dst in case:
            for c in src + dst:
                p = tok(prompt).input_ids
                both = tok(prompt + c).input_ids
                if both[: len(p)] != p or both[len(p):] != tok(c, add_special_tokens=False).input_ids:
                    raise SystemExit(f"{prompt!r} + {c!r} does not have a clean token boundary")


#: Trajectory cases: (datapoints case, optimize_vector keywords, start: "vector" (seeded start) or "random"
#: (the reference's random start after torch.manual_seed(TORCH_SEED); ours with seed=TORCH_SEED)).
TORCH_SEED = 7
TRAJECTORIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "additive": ("two_completions", dict(lr=0.1), "vector"),
    "affine": ("two_completions", dict(lr=0.05, affine_rank=2, max_affine_norm=1.5), "random"),
    "noise": ("one_per_datapoint", dict(lr=0.1, noise_scale=0.5, do_tangent_space_noise=False), "vector"),
    "antipgd": ("one", dict(lr=0.1, noise_scale=0.5, do_tangent_space_noise=False, do_antipgd=True), "vector"),
    "satisfice": ("two_completions", dict(lr=0.1, satisfice=True, target_loss=3.0), "vector"),
    "max_norm": ("two_completions", dict(lr=0.5, max_norm=50.0), "vector"),  # the start (norm 48) is inside
}


def run_trajectory(module: Any, model: Any, tok: Any, name: str, *, ours: bool) -> dict[str, Any]:
    case, kw, start = TRAJECTORIES[name]
    d = model.config.hidden_size
    kw = dict(kw)
    if start == "vector":
        kw["starting_vec"] = start_vector(d)
    if ours:  # seed=s draws the start and the noise as the reference does after torch.manual_seed(s)
        kw["seed"] = TORCH_SEED
    torch.manual_seed(TORCH_SEED)
    # both: eps=0 (the same loss; no convergence stop), the loss at every evaluation in info["loss"]
    info = module.optimize_vector(model, datapoints(module, case), LAYER, tokenizer=tok, eps=0.0,
                                  max_iters=N_STEPS if ours else N_STEPS - 1, return_vec_history=True,
                                  return_loss_history=True, do_target_loss_sum=False, **kw)[-1]
    hist = info["loss"][:N_STEPS]
    steps = [[summary(torch.as_tensor(x)) for x in entry] for entry in info["vec_history"]]
    return {"losses": [float(x) for x in hist], "steps": steps}


def run_losses(module: Any, model: Any, tok: Any, *, ours: bool, eps: float = 0.0) -> list[float]:
    v = start_vector(model.config.hidden_size)
    dps = datapoints(module, "two_completions")
    if ours:
        info = module.optimize_vector(model, dps, LAYER, tokenizer=tok, starting_vec=v, max_iters=0,
                                      do_target_loss_sum=False)[-1]
    else:  # lr=0: its one step (max_iters=0 takes one) leaves the vector; losses are at the start
        info = module.optimize_vector(model, dps, LAYER, tokenizer=tok, starting_vec=v, max_iters=0, lr=0.0,
                                      eps=eps, do_target_loss_sum=False)[-1]
    return [x for dp in info["loss"] for kind in dp for x in kind]


def run_minibatch(module: Any, model: Any, tok: Any, iters: int, *, ours: bool) -> dict[str, Any]:
    src, dst = MINIBATCH_COMPLETIONS
    torch.manual_seed(TORCH_SEED)
    kw: dict[str, Any] = dict(minibatch_size=2, lr=0.1, max_iters=iters)
    if ours:
        kw["seed"] = TORCH_SEED
    else:
        kw["eps"] = 0.0
    vec, info = module.optimize_vector_minibatch_hf(model, tok, MINIBATCH_PROMPTS, LAYER, list(src), list(dst), **kw)
    return {"loss": float(info["loss"]), "iters": int(info["iters"]), "vector": summary(vec)}


def record(ref: Any, commit: str, model: Any, tok: Any) -> dict[str, Any]:
    check_boundaries(tok)
    with cuda_is_a_no_op():
        data: dict[str, Any] = {
            "reference": {"repository": "https://github.com/jacobdunefsky/llm-steering-opt", "commit": commit,
                          "file": "steering_opt.py"},
            "model": "SmolLM2-135M-Instruct (steering_opt.models.load_model())",
            "layer": LAYER, "n_steps": N_STEPS, "n_coords": N_COORDS, "probe_seed": PROBE_SEED,
            "start_seed": START_SEED, "torch_seed": TORCH_SEED, "cases": CASES,
            "minibatch_prompts": MINIBATCH_PROMPTS, "minibatch_completions": MINIBATCH_COMPLETIONS,
            "trajectory_options": {k: [c, kw, s] for k, (c, kw, s) in TRAJECTORIES.items()},
            "signatures": {name: signature(getattr(ref, name))
                           for name in ("optimize_vector", "optimize_vector_minibatch_hf")},
            "losses_eps0": run_losses(ref, model, tok, ours=False, eps=0.0),
            "losses_eps1e-6": run_losses(ref, model, tok, ours=False, eps=1e-6),
            "trajectories": {name: run_trajectory(ref, model, tok, name, ours=False) for name in TRAJECTORIES},
            # the reference with max_iters=k reports the loss of its evaluation k (ours: loss_history[k])
            "minibatch": {str(k): run_minibatch(ref, model, tok, k, ours=False) for k in (0, 3)},
        }
    return data


def compare(data: dict[str, Any], model: Any, tok: Any) -> None:
    """Print the largest differences between this package and the recorded reference numbers."""
    import steering_opt as so

    ours = run_losses(so, model, tok, ours=True)
    print("loss at a fixed vector, |ours - reference(eps=0)|:",
          max(abs(a - b) for a, b in zip(ours, data["losses_eps0"])))
    for name in TRAJECTORIES:
        mine = run_trajectory(so, model, tok, name, ours=True)
        theirs = data["trajectories"][name]
        dl = max(abs(a - b) for a, b in zip(mine["losses"], theirs["losses"]))
        dv = max(abs(x - y) / max(1.0, abs(y))
                 for sa, sb in zip(mine["steps"], theirs["steps"]) for ta, tb in zip(sa, sb)
                 for x, y in zip([ta["norm"]] + ta["head"] + ta["probes"], [tb["norm"]] + tb["head"] + tb["probes"]))
        print(f"trajectory {name}: max |loss diff| {dl:.2e}, max relative parameter diff {dv:.2e}")
    for k in (0, 3):
        with contextlib.redirect_stdout(None):
            mine_mb = run_minibatch(so, model, tok, k, ours=True)
        print(f"minibatch max_iters={k}: ours {mine_mb['loss']:.6f} reference {data['minibatch'][str(k)]['loss']:.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="llm-steering-opt checkout or git repository")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--compare", action="store_true", help="also compare this package with the numbers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from steering_opt.models import load_model

    loaded = load_model()
    model, tok = loaded if isinstance(loaded, tuple) else (loaded, None)
    ref, commit = load_reference(args.reference)
    data = record(ref, commit, model, tok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out} (reference commit {commit})")
    if args.compare:
        compare(data, model, tok)


if __name__ == "__main__":
    main()
