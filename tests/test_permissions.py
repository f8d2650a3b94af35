"""Files and folders the library writes get the permissions of ordinary new files: the umask decides.

Under the usual umask 022 colleagues on a shared file system can read saved vectors, exports and data files
(0644 files, 0755 folders); under 077 they stay private (0600 / 0700).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import steering_opt as so
from steering_opt import fsutil
from steering_opt.jsonl import write_datapoints
from steering_opt.persist import export_gguf, export_tensors, save


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_is_read_without_changing_it(umask: int) -> None:
    assert fsutil.current_umask() == umask
    assert fsutil.current_umask() == umask


def test_everything_written_honours_the_umask(umask: int, tmp_path: Path) -> None:
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    vec = so.SteeringVector({2: torch.randn(8), 3: torch.randn(8)}, metadata={"method": "test"})
    folder = save(vec, tmp_path / "vec")
    files = [
        save(vec, tmp_path / "vec.safetensors"),
        save({"a": vec, "b": vec * 2}, tmp_path / "set"),
        export_gguf(vec, tmp_path / "vec.gguf"),
        export_tensors(vec, tmp_path / "vec.pt"),
        write_datapoints([so.TrainingDatapoint("Hi", dst_completions=[" yes"])], tmp_path / "dps.jsonl"),
    ]
    folders = [Path(folder), Path(files[1])]
    assert all(_mode(p) == dir_mode for p in folders), {str(p): oct(_mode(p)) for p in folders}
    written = [Path(p) for p in files if Path(p).is_file()]
    written += [p for f in folders for p in f.rglob("*") if p.is_file()]
    assert len(written) >= 8
    wrong = {str(p): oct(_mode(p)) for p in written if _mode(p) != file_mode}
    assert not wrong, f"expected {oct(file_mode)}: {wrong}"
    inner = [p for f in folders for p in f.rglob("*") if p.is_dir()]
    assert all(_mode(p) == dir_mode for p in inner)
