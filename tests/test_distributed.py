"""Data-parallel optimisation over torch.distributed (steering_opt.parallel).

Two CPU processes on loopback (gloo) run ``optimize_vector_minibatch_hf`` and must return the vector of a
single-process run over the same data and seed (to 1e-4), with the same steps and stop decision, each
process computing only part of every minibatch; a process that fails makes the launch fail with a clear
message within the timeouts instead of hanging; processes given different data refuse to start.

The processes are started with ``subprocess`` running this file as a script (``python
tests/test_distributed.py worker SPEC OUT``) with the variables a launcher (``accelerate launch`` /
``torchrun``) sets: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import make_tiny_model  # noqa: E402

import steering_opt as so  # noqa: E402
from steering_opt import parallel  # noqa: E402
from steering_opt.engine import FastEngine  # noqa: E402

INIT = 0.3
LAUNCH_TIMEOUT = 240.0  # seconds for a whole 2-process launch (imports + runs), then everything is killed
PG_TIMEOUT = 60.0  # process-group timeout inside the workers (a collective waits at most this long)

PROMPTS = [  # different lengths; 6 prompts, so minibatches of 4 give batches of 4 and 2
    "The capital of France is",
    "Say",
    "Once upon a time, in a land far away, there",
    "My favourite food is",
    "Here is a short story about a dragon who wanted to learn to cook:",
    "Dear diary, today I",
]
SRC = [" Paris, of course.", " no"]
DST = [" Berlin", " yes please"]

SCENARIOS: dict[str, dict[str, Any]] = {
    # cycling minibatches (4 + 2 prompts), additive, norm cap
    "minibatches": dict(minibatch_size=4, lr=0.1, max_iters=7, max_norm=3.0, seed=0),
    # one full batch, affine rank 2, clamp-free, several layers sharing the vector
    "affine_full_batch": dict(minibatch_size=8, lr=0.05, max_iters=4, affine_rank=2, max_affine_norm=1.0,
                              seed=1, layer=[1, 2]),
    # early stop on the minibatch loss; target_loss filled in by the test from a probe run
    "target": dict(minibatch_size=3, lr=0.1, max_iters=12, seed=2),
}


def _model(vocab: int) -> torch.nn.Module:
    return make_tiny_model("llama", vocab, initializer_range=INIT)


def _run(model: torch.nn.Module, tok: Any, kw: dict[str, Any], distributed: Any) -> tuple:
    kw = dict(kw)
    layer = kw.pop("layer", 1)
    mb = kw.pop("minibatch_size")
    return so.optimize_vector_minibatch_hf(model, tok, PROMPTS, layer, SRC, DST, mb, distributed=distributed, **kw)


# ------------------------------------------------------------------------------------ launcher


class LaunchError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nprocs: int, spec: dict[str, Any], out: Path, *, timeout: float = LAUNCH_TIMEOUT,
           grace: float = PG_TIMEOUT + 30) -> float:
    """Run ``nprocs`` worker processes; returns the wall time. Raises :class:`LaunchError` naming the
    first process that failed (and the others' fate) if any process fails, or if the launch outlives
    ``timeout`` / survivors outlive the first failure by ``grace`` seconds (they are then killed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    port = _free_port()
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   STEERING_OPT_TEST_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(out)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=str(TESTS.parent)))
    deadline = start + timeout
    failed_at: dict[int, float] = {}
    killed = False
    try:
        while True:
            codes = [p.poll() for p in procs]
            now = time.monotonic()
            for r, c in enumerate(codes):
                if c not in (None, 0) and r not in failed_at:
                    failed_at[r] = now
                    deadline = min(deadline, now + grace)
            if all(c is not None for c in codes):
                break
            if now > deadline:
                killed = True
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for p in procs:
                    p.wait(timeout=30)
                break
            time.sleep(0.1)
    finally:
        for log in logs:
            log.close()
    wall = time.monotonic() - start
    codes = [p.returncode for p in procs]
    if failed_at or killed:
        order = sorted(failed_at, key=failed_at.get)
        lines = []
        for r in order + [r for r in range(nprocs) if r not in failed_at]:
            tail = (out / f"rank{r}.log").read_text().strip().splitlines()[-3:]
            lines.append(f"  rank {r}: exit code {codes[r]}; last output: {' | '.join(tail)}")
        what = (f"rank {order[0]} failed first" if order else "no process failed")
        if killed:
            what += f"; processes still running after {'the grace period' if order else 'the timeout'} were killed"
        raise LaunchError(f"data-parallel launch of {nprocs} processes failed after {wall:.1f} s: {what}\n"
                          + "\n".join(lines))
    return wall


def worker(out: Path) -> None:
    """One process of a launch: init gloo from the launcher's variables, run the scenarios, save."""
    torch.set_num_threads(1)
    spec = json.loads((out / "spec.json").read_text())
    rank = int(os.environ["RANK"])
    if spec.get("explicit_init", True):
        parallel.init_distributed("gloo", timeout=PG_TIMEOUT)
    # else: optimize_vector_minibatch_hf(distributed=None) initialises it from the launcher's variables
    tok = so.load_tokenizer()
    model = _model(len(tok))
    computed: list[int] = []
    real_run = FastEngine.run

    def counting_run(self: FastEngine, spec_fn: Any, **kw: Any) -> torch.Tensor:
        subset = kw.get("subset")
        computed.append(len(self.seqs) if subset is None else len(subset))
        if rank == spec.get("fail_rank") and len(computed) == spec.get("fail_at_run"):
            raise RuntimeError(f"injected failure on rank {rank}")
        return real_run(self, spec_fn, **kw)

    FastEngine.run = counting_run  # type: ignore[method-assign]
    prompts = PROMPTS if rank != spec.get("other_prompts_rank") else list(reversed(PROMPTS))
    results = {}
    for name, kw in spec["scenarios"].items():
        computed.clear()
        kw = dict(kw)
        layer = kw.pop("layer", 1)
        mb = kw.pop("minibatch_size")
        res = so.optimize_vector_minibatch_hf(model, tok, prompts, layer, SRC, DST, mb, **kw)
        results[name] = dict(vector=res[0], matrix=res[1] if len(res) == 3 else None, info=res[-1],
                             computed=list(computed))
    results["initialised"] = torch.distributed.is_initialized()
    torch.save(results, out / f"result{rank}.pt")
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def model(tokenizer):
    return _model(len(tokenizer))


@pytest.fixture(scope="module")
def scenarios(model, tokenizer) -> dict[str, dict[str, Any]]:
    """The scenarios, with the early-stop target chosen between two losses of a probe run so that the
    stop falls on a definite step (margins far above float32 rounding)."""
    out = {k: dict(v) for k, v in SCENARIOS.items()}
    kw = dict(out["target"])
    probe = _run(model, tokenizer, kw, distributed=False)[-1]["loss_history"]
    h = probe
    # the first evaluation from step 3 on whose minibatch loss is below every earlier one
    i = next((i for i in range(3, len(h)) if h[i] < min(h[:i])), None)
    assert i is not None, f"no usable target in {h}"
    assert min(h[:i]) - h[i] > 1e-3 * abs(h[i]), "the margin must dwarf float32 rounding"
    out["target"]["target_loss"] = (h[i] + min(h[:i])) / 2
    return out


@pytest.fixture(scope="module")
def single(model, tokenizer, scenarios) -> dict[str, tuple]:
    """Single-process results, and the number of sequences computed at every evaluation."""
    out = {}
    real_run = FastEngine.run
    for name, kw in scenarios.items():
        computed: list[int] = []

        def counting_run(self, spec_fn, computed=computed, **k):
            computed.append(len(self.seqs) if k.get("subset") is None else len(k["subset"]))
            return real_run(self, spec_fn, **k)

        FastEngine.run = counting_run
        try:
            out[name] = (*_run(model, tokenizer, kw, distributed=False), computed)
        finally:
            FastEngine.run = real_run
    return out


def test_two_gloo_processes_give_the_single_process_vector(tmp_path, single, scenarios):
    # no init_process_group in the workers: distributed=None finds the launcher's variables and does it
    launch(2, {"scenarios": scenarios, "explicit_init": False}, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in (0, 1))
    assert r0.pop("initialised") and r1.pop("initialised")
    assert single["target"][-2]["status"] == "target_reached"
    assert single["target"][-2]["iters"] < scenarios["target"]["max_iters"]
    for name, (*ref, ref_computed) in single.items():
        a, b = r0[name], r1[name]
        assert torch.equal(a["vector"], b["vector"]), f"{name}: the processes ended with different vectors"
        assert a["info"]["processes"] == 2
        err = float((a["vector"] - ref[0]).norm() / ref[0].norm())
        assert err < 1e-4, f"{name}: distributed vs single-process vector relative error {err:.2e}"
        for key in ("iters", "status"):
            assert a["info"][key] == ref[-1][key], f"{name}: {key} {a['info'][key]} != {ref[-1][key]}"
        torch.testing.assert_close(torch.tensor(a["info"]["loss_history"]), torch.tensor(ref[-1]["loss_history"]),
                                   rtol=1e-4, atol=1e-5)
        if a["matrix"] is not None:
            assert torch.equal(a["matrix"], b["matrix"])
            assert float((a["matrix"] - ref[1]).norm() / ref[1].norm()) < 1e-4
        # the work was split: each process computed part of every evaluation, together all of it
        assert len(a["computed"]) == len(b["computed"]) == len(ref_computed) == len(ref[-1]["loss_history"])
        for step, (x, y, n) in enumerate(zip(a["computed"], b["computed"], ref_computed)):
            assert x + y == n and x > 0 and y > 0, (name, step, x, y, n)


def test_a_failed_process_fails_the_launch_with_a_clear_message(tmp_path, scenarios):
    spec = {"scenarios": {"minibatches": scenarios["minibatches"]}, "fail_rank": 1, "fail_at_run": 3}
    start = time.monotonic()
    with pytest.raises(LaunchError) as exc:
        launch(2, spec, tmp_path)
    elapsed = time.monotonic() - start
    msg = str(exc.value)
    assert "rank 1 failed first" in msg and "injected failure on rank 1" in msg, msg
    survivor = (tmp_path / "rank0.log").read_text()
    # the survivor did not hang: it stopped in the next collective with the library's message
    assert "steering_opt data-parallel: could not all-reduce" in survivor, survivor[-2000:]
    assert "another process probably failed" in survivor
    assert "rank 0: exit code 1" in msg
    assert "killed" not in msg, "the surviving process had to be killed: it hung"
    assert elapsed < LAUNCH_TIMEOUT


def test_processes_with_different_data_refuse_to_start(tmp_path, scenarios):
    spec = {"scenarios": {"minibatches": scenarios["minibatches"]}, "other_prompts_rank": 1}
    with pytest.raises(LaunchError) as exc:
        launch(2, spec, tmp_path)
    for r in (0, 1):
        log = (tmp_path / f"rank{r}.log").read_text()
        assert "ValueError: steering_opt data-parallel: the processes were given different prompts" in log, log[-2000:]
    assert "exit code 1" in str(exc.value)


def test_one_process_group_in_process_matches_plain_run(model, tokenizer, single, scenarios):
    """distributed=True with a 1-process gloo group runs the data-parallel wrapper (a shard of everything,
    all-reduce over one process) and gives the plain result; auto with one process stays plain."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    try:
        kw = scenarios["minibatches"]
        on = _run(model, tokenizer, kw, distributed=True)
        auto = _run(model, tokenizer, kw, distributed=None)
        group = _run(model, tokenizer, kw, distributed=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    ref = single["minibatches"][:-1]
    assert on[-1]["processes"] == 1 and group[-1]["processes"] == 1 and "processes" not in auto[-1]
    for res in (on, auto, group):
        torch.testing.assert_close(res[0], ref[0], rtol=1e-6, atol=1e-7)
        assert res[-1]["iters"] == ref[-1]["iters"]


def test_distributed_argument_is_checked_before_any_work(model, tokenizer, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TypeError, match="`distributed`"):
            _run(model, tokenizer, SCENARIOS["minibatches"], distributed="yes")
        with pytest.raises(ValueError, match="`distributed=True` but torch.distributed is not initialised"):
            _run(model, tokenizer, SCENARIOS["minibatches"], distributed=True)
    finally:
        handle.remove()
    assert calls == []
    assert parallel.resolve_distributed(None) is None and parallel.resolve_distributed(False) is None
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        parallel.init_distributed("gloo")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]))
