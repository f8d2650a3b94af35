"""Basic end-to-end tests of the ``steering-opt`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from steering_opt.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "steering_opt", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


@pytest.mark.embedded
def test_demo_end_to_end() -> None:
    proc = _run("demo", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Give me a short recipe for pancakes." in proc.stdout
    assert "Optimised a vector at layer 6: 30 steps" in proc.stdout
    steered = [line.split("steered:", 1)[1] for line in proc.stdout.splitlines() if line.strip().startswith("steered:")]
    assert len(steered) == 4
    # the one-shot refusal vector generalises: held-out answers start refusing
    assert sum("sorry" in s.lower() for s in steered) >= 3, proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.embedded
def test_console_script_demo() -> None:
    script = Path(sys.executable).parent / "steering-opt"
    if not script.exists():
        pytest.skip("steering-opt console script not installed (pip install -e .)")
    proc = subprocess.run([str(script), "demo", "--max-new-tokens", "3", "--max-iters", "2"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Optimised a vector at layer 6: 2 steps" in proc.stdout


def test_bad_dtype_one_line_exit_2() -> None:
    proc = _run("demo", "--dtype", "bf17")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "bf17" in lines[0] and "dtype" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demo", "--dtype", "bf17"], "unknown dtype"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["demo", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["demo", "--device", "gpu"], "--device"),
        (["demo", "--model", "./no/such/model-folder"], "does not exist"),
        (["demo", "--model", "no-such-org/no-such-model-steering-opt"], "no-such-model-steering-opt"),
        (["no-such-command"], "invalid choice"),
        ([], "usage"),
    ],
)
def test_user_errors_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    if argv:  # one line, after the "loading MODEL ..." announcement of the commands that load a model
        assert len([line for line in err.strip().splitlines() if not line.startswith("loading ")]) == 1, err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    assert "--max-new-tokens" in capsys.readouterr().out
