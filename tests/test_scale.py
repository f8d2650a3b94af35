"""Many independent jobs in one pass (steering_opt.scale.optimize_many, issue "Scale").

Batched jobs must equal separate ``optimize_vector`` calls: vectors to 1e-4, the same number of steps,
the same early-stop decisions, across additive, clamp and affine jobs, mixed layers, noise, token
positions and prompts of different lengths; jobs sharing a layer must really share passes, and a
stopped job must leave the batch. Per-row steering (``RowSteerSpec``) is checked against the
reference engine directly. Arguments are validated before any model work, and the model is left as
it was found.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_model

import steering_opt as so
from steering_opt.data import SRC, tokenize_datapoints
from steering_opt.engine import FastEngine, Objective, ReferenceEngine, SteerSpec
from steering_opt.loop import JobState
from steering_opt.parameterization import Additive, Affine, Clamp
from steering_opt.scale import Job, optimize_many

INIT = 0.3
D = 64
TOL = 1e-4

TD = so.TrainingDatapoint
P1 = TD("The capital of France is", src_completions=[" Paris, of course.", " Rome"], dst_completions=[" Berlin"])
P2 = TD("Say", src_completions=[" no"], dst_completions=[" yes please", " ok"])
P3 = TD("Once upon a time, in a land far away, there", dst_completions=[" lived a king"])
P2_NEG = dataclasses.replace(P2, is_negative=True)
P_TOK = TD("The weather today is", src_completions=[" sunny"], dst_completions=[" rainy and cold"],
           token=slice(-2, None))
P_INT = TD("My favourite colour is", src_completions=[" blue"], dst_completions=[" green"], token=[1, -1])


def base_jobs() -> list[Job]:
    """Jobs of every kind; target-loss jobs get their targets from :func:`with_targets`."""
    v0 = torch.randn(D, generator=torch.Generator().manual_seed(99))
    return [
        Job([P1], 1, lr=0.1, max_iters=6, seed=0, name="additive"),
        Job([P2, P3], 1, lr=0.1, max_iters=6, seed=1, max_norm=0.8, name="norm_cap"),
        Job([P1, P_TOK], 1, lr=0.1, max_iters=6, seed=2, vector_clamp=1.5, name="clamp_tokens"),
        Job([P2_NEG, P_INT], 1, lr=0.05, max_iters=5, starting_vec=v0, vector_clamp=-0.5, name="clamp_negative"),
        Job([P3, P1], 1, lr=0.1, max_iters=6, seed=4, affine_rank=2, max_affine_norm=0.5, max_norm=1.0,
            name="affine2"),
        Job([P2], 1, lr=0.1, max_iters=4, seed=5, affine_rank=1, starting_affine_norm=0.3, name="affine1"),
        Job([P1, P2, P3], 2, lr=0.1, max_iters=5, seed=6, noise_scale=0.2, name="tangent_noise_L2"),
        Job([P3], 2, lr=0.1, max_iters=5, seed=7, noise_scale=0.3, do_tangent_space_noise=False, name="noise_L2"),
        Job([P1, P2_NEG], [0, 2], lr=0.1, max_iters=5, seed=8, name="layers_0_2"),
        Job([P2, P3], 1, lr=0.1, max_iters=12, seed=9, target_loss_target_iters=2, name="target_sum"),
        Job([P1], 1, lr=0.1, max_iters=12, seed=10, do_target_loss_sum=False, name="target_each"),
        Job([P2, P1], 1, lr=0.1, max_iters=5, seed=11, coldness=1.3, do_one_minus=False,
            normalize_token_length=True, name="other_objective"),
        Job([P1, P3], 1, lr=0.1, max_iters=5, seed=12, only_hook_prompt=True, name="only_prompt"),
        Job([P3], 1, lr=0.01, eps=0.5, seed=13, name="converged"),
        Job([P2], 1, lr=0.1, max_iters=0, seed=14, name="zero_iters"),
    ]


def separate(model, tok, job: Job):
    return so.optimize_vector(model, list(job.datapoints), job.layer, tokenizer=tok, **job.kwargs())


def with_targets(model, tok, jobs: list[Job]) -> list[Job]:
    """Give the target-loss jobs a target far (> 1e-3 relative) from every loss of their trajectory,
    crossed after a few steps, so that batched and separate runs must stop at the same step."""
    out = []
    for job in jobs:
        if job.name == "target_sum":  # summed loss below target twice in a row
            h = separate(model, tok, job)[-1]["loss_history"]
            k = 3
            assert all(a > b for a, b in zip(h, h[1:])), f"probe trajectory is not decreasing: {h}"
            job = dataclasses.replace(job, target_loss=(h[k - 1] + h[k]) / 2)
            assert min(abs(x - job.target_loss) for x in h) > 1e-3 * abs(job.target_loss)
        elif job.name == "target_each":  # every completion below target
            worst = []
            for it in range(8):
                info = separate(model, tok, dataclasses.replace(job, max_iters=it))[-1]
                worst.append(max(x for kinds in info["completion_losses"] for ks in kinds for x in ks))
            k = next(i for i in range(3, 8) if worst[i] < min(worst[:i]))
            job = dataclasses.replace(job, target_loss=(worst[k] + min(worst[:k])) / 2)
            assert min(abs(x - job.target_loss) for x in worst[: k + 1]) > 1e-3 * abs(job.target_loss)
        out.append(job)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return make_tiny_model(request.param, len(tokenizer), initializer_range=INIT)


@pytest.fixture(scope="module")
def jobs(model, tokenizer):
    return with_targets(model, tokenizer, base_jobs())


def record_runs(monkeypatch) -> list[tuple[int, int]]:
    """Record (engine id, number of sequences computed) for every FastEngine.run.

    The engines are kept alive in ``alive`` so that a finished group's engine cannot be freed and its
    ``id`` reused by the next group's engine (which made group counting flaky)."""
    calls: list[tuple[int, int]] = []
    alive: list[FastEngine] = []
    real = FastEngine.run

    def run(self, spec_fn, **kw):
        subset = kw.get("subset")
        if not any(e is self for e in alive):
            alive.append(self)
        calls.append((id(self), len(self.seqs) if subset is None else len(subset)))
        return real(self, spec_fn, **kw)

    monkeypatch.setattr(FastEngine, "run", run)
    return calls


def assert_same_result(got, ref, name):
    assert len(got) == len(ref), name
    g_info, r_info = got[-1], ref[-1]
    err = float((got[0] - ref[0]).norm() / ref[0].norm())
    assert err < TOL, f"{name}: vector relative error {err:.2e}"
    assert g_info["iters"] == r_info["iters"], f"{name}: {g_info['iters']} vs {r_info['iters']} steps"
    assert g_info["status"] == r_info["status"], f"{name}: {g_info['status']} vs {r_info['status']}"
    torch.testing.assert_close(torch.tensor(g_info["loss_history"]), torch.tensor(r_info["loss_history"]),
                               rtol=TOL, atol=1e-5)
    flat = [x for kinds in r_info["completion_losses"] for ks in kinds for x in ks]
    g_flat = [x for kinds in g_info["completion_losses"] for ks in kinds for x in ks]
    torch.testing.assert_close(torch.tensor(g_flat), torch.tensor(flat), rtol=TOL, atol=1e-5)
    assert g_info["norm"] == pytest.approx(r_info["norm"], rel=TOL)
    if len(ref) == 3:
        # M = LᵀR is a product of two Adam-updated factors: float32 rounding of a differently shaped batch
        # is amplified there (measured on the embedded model: 0.96e-4 before the redesign, 1.02e-4 after)
        assert float((got[1] - ref[1]).norm() / ref[1].norm()) < 2 * TOL, f"{name}: matrix"
        for a, b in zip(g_info["affine_factors"], r_info["affine_factors"]):
            assert float((a - b).norm() / b.norm()) < TOL


def test_batched_jobs_equal_separate_runs(model, tokenizer, jobs, monkeypatch):
    refs = [separate(model, tokenizer, job) for job in jobs]
    # the cases are what they claim: several stop rules and stop times
    by_name = {job.name: ref[-1] for job, ref in zip(jobs, refs)}
    assert by_name["target_sum"]["status"] == by_name["target_each"]["status"] == "target_reached"
    assert by_name["target_sum"]["iters"] == 4 and 3 <= by_name["target_each"]["iters"] < 8
    assert by_name["converged"]["status"] == "converged" and by_name["zero_iters"]["iters"] == 0
    assert by_name["norm_cap"]["norm"] == pytest.approx(0.8, rel=1e-5)

    calls = record_runs(monkeypatch)
    got = optimize_many(model, jobs, tokenizer=tokenizer)
    assert len(got) == len(jobs)
    for job, g, r in zip(jobs, got, refs):
        assert g[-1]["job"] == job.name
        assert_same_result(g, r, job.name)

    # one engine per group (layer 1, layer 2, layers 0+2, layer 1 with the other objective), and
    # each group makes as many passes as its longest job evaluates (+1 for the tangent-noise gradients)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        layers = tuple(sorted(job.layer if isinstance(job.layer, list) else [job.layer]))
        groups.setdefault((layers, job.coldness), []).append(i)
    engines = list(dict.fromkeys(e for e, _ in calls))
    assert len(engines) == len(groups) == 4
    n_seqs = [len(tokenize_datapoints(tokenizer, list(j.datapoints))) for j in jobs]
    for engine, members in zip(engines, groups.values()):
        sizes = [n for e, n in calls if e == engine]
        if any(jobs[i].noise_scale and jobs[i].do_tangent_space_noise for i in members):
            sizes = sizes[1:]
        evals = [len(refs[i][-1]["loss_history"]) for i in members]
        # at pass e the batch holds exactly the jobs that evaluate at least e+1 times
        expected = [sum(n_seqs[i] for i, n in zip(members, evals) if n > e) for e in range(max(evals))]
        assert sizes == expected
    main = [n for e, n in calls if e == engines[0]]
    assert len(set(main)) >= 3, "jobs of the main group should stop at different times"
    total_separate = sum(len(r[-1]["loss_history"]) for r in refs)
    assert len(calls) < total_separate / 3


def test_seedless_jobs_draw_their_seeds_in_job_order(tokenizer):
    model = make_tiny_model("llama", len(tokenizer), initializer_range=INIT)
    jobs = [Job([P1], 2, lr=0.1, max_iters=2), Job([P2], 1, lr=0.1, max_iters=3),
            Job([P3], 2, lr=0.1, max_iters=1, affine_rank=1)]
    torch.manual_seed(1234)
    got = optimize_many(model, jobs, tokenizer=tokenizer)
    torch.manual_seed(1234)
    refs = [separate(model, tokenizer, job) for job in jobs]
    for i, (g, r) in enumerate(zip(got, refs)):
        assert_same_result(g, r, f"job {i}")


def test_row_spec_matches_reference_engine_per_job(tokenizer):
    """Mixed additive / clamp / affine rows in one fast-engine batch give each job the losses and
    gradients of the reference engine steering that job alone."""
    model = make_tiny_model("llama", len(tokenizer), initializer_range=INIT)
    g = torch.Generator().manual_seed(0)
    kinds = [("add", [P1, P_TOK]), ("clamp", [P2_NEG]), ("affine", [P3, P_INT]), ("clamp", [P1]),
             ("affine1", [P2])]
    per_job, seqs, pos = [], [], []
    for j, (kind, dps) in enumerate(kinds):
        s = tokenize_datapoints(tokenizer, dps)
        v = (torch.randn(D, generator=g) * 2).requires_grad_(True)
        r = 2 if kind == "affine" else 1
        lr_ = [(torch.randn(r, D, generator=g) * 0.2).requires_grad_(True) for _ in range(2)] \
            if kind.startswith("affine") else None
        c = {"clamp": 1.5 if j == 1 else -0.7}.get(kind)
        per_job.append((s, v, c, lr_))
        seqs += [dataclasses.replace(x, datapoint=x.datapoint + 100 * j) for x in s]  # no shared rows
        pos += [j] * len(s)
    pos_t = torch.tensor(pos)
    signs = torch.tensor([x.sign for x in seqs])
    is_src = torch.tensor([x.kind == SRC for x in seqs], dtype=torch.float32)

    def param(v, c, lr_):
        return Clamp(v, c) if c is not None else Affine(v, *lr_) if lr_ else Additive(v)

    params = [param(v, c, lr_) for _, v, c, lr_ in per_job]

    def spec_fn(idx):
        jobs_of = pos_t[idx]
        rows = torch.stack([per_job[j][1] for j in range(len(kinds))])[jobs_of] * signs[idx][:, None]
        return SteerSpec(rows={1: rows}, params={1: params}, which=jobs_of)

    fast = FastEngine(model, seqs, [1], Objective(), max_batch_tokens=40)  # several chunks
    losses = fast.run(spec_fn, weights=is_src + 0.5)
    fast_grads = [[t.grad.clone() for t in [v] + (lr_ or [])] for _, v, _, lr_ in per_job]
    start = 0
    for j, (s, v, c, lr_) in enumerate(per_job):
        tensors = [v] + (lr_ or [])
        for t in tensors:
            t.grad = None
        ref = ReferenceEngine(model, s, [1], Objective())
        signs_j = torch.tensor([x.sign for x in s])

        def ref_spec(idx, v=v, c=c, lr_=lr_, signs_j=signs_j):
            return SteerSpec(rows={1: signs_j[idx][:, None] * v[None]}, params={1: [param(v, c, lr_)]})

        w = torch.tensor([x.kind == SRC for x in s], dtype=torch.float32) + 0.5
        ref_losses = ref.run(ref_spec, weights=w)
        torch.testing.assert_close(losses[start: start + len(s)], ref_losses, rtol=TOL, atol=1e-6)
        for a, t in zip(fast_grads[j], tensors):
            assert float(t.grad.norm()) > 0
            err = float((a - t.grad).norm() / t.grad.norm())
            assert err < TOL, f"job {j} ({kinds[j][0]}): gradient relative error {err:.2e}"
        start += len(s)


def test_row_spec_zero_clamp_vector_is_an_error():
    h = torch.randn(2, 3, D)
    clamps = [Clamp(torch.zeros(D), 1.0), Clamp(torch.ones(D), 1.0)]
    spec = SteerSpec(rows={0: torch.stack([torch.zeros(D), torch.ones(D)])}, params={0: clamps},
                     which=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-zero vector"):
        spec.apply(h, 0, None)
    # a zero vector on an additive row is fine, and its gradient is finite, also batched with clamp rows
    v = torch.zeros(2, D, requires_grad=True)
    mixed = [Additive(torch.zeros(D)), Clamp(torch.ones(D), 1.0)]
    out = SteerSpec(rows={0: v}, params={0: mixed}, which=torch.tensor([0, 0])).apply(h, 0, None)
    out.sum().backward()
    assert torch.isfinite(v.grad).all() and torch.equal(out, h)


GOOD = dict(datapoints=[P1], layer=1, max_iters=1)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(lr=-1.0), ValueError, r"jobs\[1\]: `lr` must be a positive"),
    (dict(layer=7), ValueError, r"jobs\[1\]: layer=7 is out of range"),
    (dict(layer="a"), TypeError, r"jobs\[1\]: layer must be an int"),
    (dict(datapoints=[]), ValueError, r"jobs\[1\]: `datapoints` must be a non-empty list"),
    (dict(datapoints=["x"]), TypeError, r"jobs\[1\]: `datapoints\[0\]` must be a TrainingDatapoint"),
    (dict(max_iters=-2), ValueError, r"jobs\[1\]: `max_iters`"),
    (dict(max_iters=2.0), ValueError, r"jobs\[1\]: `max_iters`"),
    (dict(target_loss_target_iters=0), ValueError, r"jobs\[1\]: `target_loss_target_iters`"),
    (dict(affine_rank=65), ValueError, r"jobs\[1\]: `affine_rank` must be an int in \[1, 64\]"),
    (dict(affine_rank=1, vector_clamp=1.0), ValueError, r"jobs\[1\]: `vector_clamp` and `affine_rank`"),
    (dict(vector_clamp=float("inf")), ValueError, r"jobs\[1\]: `vector_clamp` must be a finite"),
    (dict(starting_vec=torch.zeros(5)), ValueError, r"jobs\[1\]: `starting_vec` must have shape \(64,\)"),
    (dict(starting_vec=[0.0] * 64), TypeError, r"jobs\[1\]: `starting_vec` must be a torch.Tensor"),
    (dict(starting_vec=torch.zeros(64), vector_clamp=1.0), ValueError, r"jobs\[1\]: `vector_clamp` needs a non-zero"),
    (dict(max_norm=0), ValueError, r"jobs\[1\]: `max_norm`"),
    (dict(noise_scale=-0.1), ValueError, r"jobs\[1\]: `noise_scale`"),
    (dict(coldness=0), ValueError, r"jobs\[1\]: `coldness`"),
    (dict(seed=1.5), TypeError, r"jobs\[1\]: `seed`"),
    (dict(do_one_minus="yes"), TypeError, r"jobs\[1\]: `do_one_minus` must be a bool"),
    (dict(target_loss="low"), ValueError, r"jobs\[1\]: `target_loss`"),
])
def test_bad_jobs_are_rejected_before_any_work(tokenizer, bad, exc, match):
    model = make_tiny_model("llama", len(tokenizer))
    forwards = []
    handle = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(exc, match=match):
            optimize_many(model, [Job(**GOOD), Job(**{**GOOD, **bad})], tokenizer=tokenizer)
    finally:
        handle.remove()
    assert forwards == []


def test_bad_call_arguments(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match="`jobs` must be a non-empty list"):
        optimize_many(model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`jobs` must be a non-empty list"):
        optimize_many(model, Job(**GOOD), tokenizer=tokenizer)
    with pytest.raises(TypeError, match=r"`jobs\[0\]` must be a steering_opt.scale.Job"):
        optimize_many(model, [dict(GOOD)], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        optimize_many(model, [Job(**GOOD)])
    with pytest.raises(ValueError, match="`max_batch_tokens`"):
        optimize_many(model, [Job(**GOOD)], tokenizer=tokenizer, max_batch_tokens=0)
    long = TD("word " * 1100, dst_completions=[" x"])
    with pytest.raises(ValueError, match=r"jobs\[0\]: datapoints\[0\]: prompt \+ completion is"):
        optimize_many(model, [Job([long], 1)], tokenizer=tokenizer)


def _model_state(model):
    return ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            [p.detach().clone() for p in model.parameters()])


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("fail", [False, True])
def test_model_is_left_as_found(tokenizer, monkeypatch, fail):
    model = make_tiny_model("llama", len(tokenizer))
    model.train()
    model.model.layers[0].eval()
    for p in list(model.parameters())[::3]:
        p.requires_grad_(False)
    before = _model_state(model)
    hooks = _hook_count(model)
    jobs = [Job([P1], 1, max_iters=3, seed=0), Job([P2], 2, max_iters=3, seed=1, vector_clamp=1.0),
            Job([P3], 1, max_iters=2, seed=2, affine_rank=1)]
    if fail:
        real = JobState.after_eval
        n = []

        def after_eval(self, sub):
            n.append(1)
            if len(n) == 4:
                raise KeyboardInterrupt
            return real(self, sub)

        monkeypatch.setattr(JobState, "after_eval", after_eval)
        with pytest.raises(KeyboardInterrupt):
            optimize_many(model, jobs, tokenizer=tokenizer)
    else:
        out = optimize_many(model, jobs, tokenizer=tokenizer)
        assert [len(r) for r in out] == [2, 2, 3]
        assert out[2][1].shape == (D, D) and out[0][0].shape == (D,)
        assert all(not r[0].requires_grad for r in out)
    after = _model_state(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    assert all(p.grad is None for p in model.parameters())
    assert _hook_count(model) == hooks


def test_embedded_model_jobs_equal_separate_runs(embedded_model, embedded_tokenizer):
    """On the real 30-block model (massive first-token activations, float32): additive, clamp and
    affine jobs at layer 6 plus one at layer 10, batched vs separate."""
    dps = [TD("The recipe needs", src_completions=[" flour"], dst_completions=[" harina de trigo"]),
           TD("Hola, ¿cómo", dst_completions=[" estás?"])]
    jobs = [Job(dps, 6, lr=0.1, max_iters=2, seed=0, starting_norm=4.0),
            Job(dps[:1], 6, lr=0.1, max_iters=2, seed=1, vector_clamp=2.0, starting_norm=4.0),
            Job(dps[1:], 6, lr=0.1, max_iters=2, seed=2, affine_rank=1, starting_norm=4.0),
            Job(dps, 10, lr=0.1, max_iters=1, seed=3, starting_norm=4.0)]
    got = optimize_many(embedded_model, jobs, tokenizer=embedded_tokenizer)
    for i, job in enumerate(jobs):
        assert_same_result(got[i], separate(embedded_model, embedded_tokenizer, job), f"job {i}")
