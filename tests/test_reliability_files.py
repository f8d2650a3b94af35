"""File-system faults, hostile-but-valid files and input limits (docs/guarantees-files.md).

Each test reproduces a failure found by a demanding user: writers killed mid-save, a full disk, symlinked
targets, a silently corrupted model cache, files crafted to be expensive or ambiguous, and command-line inputs
that are endless, huge or numerically absurd.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_HIDDEN, make_tiny_model
from safetensors.torch import save_file

import steering_opt as so
from steering_opt import fsutil, interop, jsonl, models, persist
from steering_opt.cli import main
from steering_opt.codec import SteeringFileError
from steering_opt.data import TrainingDatapoint, tokenize_datapoints

D = TINY_HIDDEN
posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")


def _vec(sign: float = 1.0, layer: int = 2) -> so.SteeringVector:
    return so.SteeringVector({layer: sign * torch.ones(D)})


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _killed_child(action: Any) -> None:
    """Run ``action()`` in a forked child that is expected to SIGKILL itself; wait for it."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            action()
        finally:
            os._exit(0)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child was not killed"


def _kill_self(*_: Any, **__: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------- faults mid-write


@posix_only
def test_temporaries_of_killed_writers_are_cleaned_by_the_next_save(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    folder, single, exported = tmp_path / "vec", tmp_path / "v.safetensors", tmp_path / "v.pt"

    def killed_saves() -> None:
        monkeypatch.setattr(safetensors.torch, "save_file", _kill_self)
        so.save(_vec(), folder)

    def killed_single() -> None:
        monkeypatch.setattr(safetensors.torch, "save_file", _kill_self)
        so.save(_vec(), single)

    def killed_export() -> None:
        monkeypatch.setattr(torch, "save", _kill_self)
        so.export_tensors(_vec(), exported)

    for action in (killed_saves, killed_saves, killed_single, killed_export):
        _killed_child(action)
    assert len(_hidden(tmp_path)) >= 3  # the temporaries the killed writers left (the 2nd save cleans the 1st's)
    # a live writer's temporary (another process, still running) must survive the cleaning
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = getattr(fsutil, "_HOST", "00000000")
        live = tmp_path / f".vec.tmp-{host}-{sleeper.pid}-abcd1234"
        live.mkdir()
        so.save(_vec(-1.0), folder)
        so.save(_vec(-1.0), single)
        so.export_tensors(_vec(-1.0), exported)
        assert _hidden(tmp_path) == [live.name]
    finally:
        sleeper.kill()
        sleeper.wait()
    so.save(_vec(), folder)  # its writer is gone now
    assert _hidden(tmp_path) == []
    assert torch.equal(so.load(single).layer_activations[2], -torch.ones(D))


@posix_only
def test_kill_between_the_two_renames_keeps_the_previous_save(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vec"
    so.save(_vec(), path)
    real_rename = os.rename

    def rename_then_die(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        if ".old-" in os.fspath(dst):  # the old folder was moved aside; the new one is not in place yet
            _kill_self()

    def killed() -> None:
        monkeypatch.setattr(os, "rename", rename_then_die)
        so.save(_vec(-1.0, layer=3), path)

    _killed_child(killed)
    back = so.load(path)  # the previous save is found and put back
    assert isinstance(back, so.SteeringVector) and back.layers == [2]
    assert torch.equal(back.layer_activations[2], torch.ones(D))
    assert path.is_dir()
    so.save(_vec(-1.0), path)  # and the next save leaves nothing behind
    assert _hidden(tmp_path) == []


def test_full_disk_is_an_oserror_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    folder, single = tmp_path / "vec", tmp_path / "v.safetensors"
    so.save(_vec(), folder)
    so.save(_vec(), single)
    before = {p: p.read_bytes() for p in [single, *folder.iterdir()]}

    def full(*_: Any, **__: Any) -> None:
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for target in (folder, single):
        with pytest.raises(OSError) as info:
            so.save(_vec(-1.0), target)
        assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)

    def torch_full(*_: Any, **__: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(OSError, match="v.pt"):
        so.export_tensors(_vec(), tmp_path / "v.pt")

    def np_full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name: the caller's path is added

    monkeypatch.setattr(np, "savez", np_full)
    with pytest.raises(OSError) as info2:
        so.export_tensors(_vec(), tmp_path / "v.npz")
    assert info2.value.errno == errno.ENOSPC and "v.npz" in str(info2.value)
    assert {p: p.read_bytes() for p in [single, *folder.iterdir()]} == before
    assert _hidden(tmp_path) == []
    # the command line: one line on stderr, exit 2, no traceback
    monkeypatch.setattr(torch, "save", torch_full)
    assert main(["export", str(folder), "--out", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w.pt" in err[0] and "Traceback" not in err[0], err


def test_replacing_a_symlinked_folder_leaves_nothing_behind(tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    so.save(_vec(), real)
    link.symlink_to(real, target_is_directory=True)
    so.save(_vec(-1.0), link)
    assert _hidden(tmp_path) == []
    assert torch.equal(so.load(link).layer_activations[2], -torch.ones(D))
    assert torch.equal(so.load(real).layer_activations[2], torch.ones(D))  # what the link pointed to is kept


def _fake_cache(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(256)}, str(folder / models.WEIGHTS_FILE))
    (folder / "config.json").write_text("{}")
    files = {p.name: {"size": p.stat().st_size, "sha256": fsutil.sha256_file(p)} for p in folder.iterdir()}
    (folder / models.MANIFEST_FILE).write_text(json.dumps({"version": models.MANIFEST_VERSION, "files": files}))
    return folder / models.WEIGHTS_FILE


def test_same_size_corruption_of_the_model_cache_is_detected(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package() -> Path:
        raise FileNotFoundError("not installed")

    monkeypatch.setattr(models, "embedded_gguf_path", no_package)
    weights = _fake_cache(tmp_path / "cache")
    assert models.is_cache_valid(tmp_path / "cache")
    hashed: list[Path] = []
    real_sha = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: hashed.append(Path(p)) or real_sha(p))
    assert models.is_cache_valid(tmp_path / "cache") and hashed == []  # unchanged: stat signatures only
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4:] = np.array([np.nan], dtype=np.float32).tobytes()  # one weight becomes NaN, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time
    assert weights.stat().st_size == st.st_size
    assert not models.is_cache_valid(tmp_path / "cache")
    assert hashed == [weights]


# ------------------------------------------------------------------------------------------ saving over things


def test_save_refuses_to_replace_a_foreign_safetensors_file(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    save_file({"embed": torch.zeros(4, 4)}, str(weights))
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="not a steering_opt save.*overwrite=True"):
        so.save(_vec(), weights)
    assert weights.read_bytes() == before
    so.save(_vec(), weights, overwrite=True)
    so.save(_vec(-1.0), weights)  # now it is ours: replaced without asking
    assert torch.equal(so.load(weights).layer_activations[2], -torch.ones(D))


def test_non_utf8_paths_are_refused_up_front(tmp_path: Path) -> None:
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/vec\xff")
    for call in (lambda: so.save(_vec(), bad), lambda: so.save(_vec(), bad + ".safetensors"),
                 lambda: so.export_tensors(_vec(), bad + ".pt"), lambda: so.load(bad)):
        with pytest.raises(ValueError, match="not valid UTF-8"):
            call()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ hostile but valid files


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_or_huge_metadata_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "vec"
    so.save(_vec(), folder)
    doc = json.loads((folder / persist.VECTOR_FILE).read_text())
    doc["metadata"]["deep"] = _nested(900)
    (folder / persist.VECTOR_FILE).write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match="nested more than 64"):
        so.load(folder)
    with pytest.raises(ValueError, match="nested more than 64"):  # not a RecursionError
        so.save(so.SteeringVector({2: torch.ones(D)}, metadata={"deep": _nested(900)}), tmp_path / "w")
    monkeypatch.setattr(persist, "MAX_METADATA_BYTES", 1000)
    monkeypatch.setattr("steering_opt.codec.MAX_METADATA_BYTES", 1000)
    doc["metadata"]["deep"] = "y" * 5000
    (folder / persist.VECTOR_FILE).write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match="over the metadata limit"):
        so.load(folder)


def _gguf(path: Path, names: list[str]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), interop.GGUF_ARCH)
    for name in names:
        writer.add_tensor(name, np.ones(D, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_two_tensors_naming_the_same_layer_are_refused(tmp_path: Path) -> None:
    _gguf(tmp_path / "dup.gguf", ["direction.1", "direction.01"])
    with pytest.raises(SteeringFileError, match="both name llama.cpp layer 1"):
        so.load(tmp_path / "dup.gguf")
    np.savez(tmp_path / "dup.npz", layer_1=np.ones(D, np.float32), layer_01=-np.ones(D, np.float32))
    with pytest.raises(SteeringFileError, match="name layer 1"):
        so.load(tmp_path / "dup.npz")
    folder = tmp_path / "vec"
    so.save(_vec(), folder)
    doc = json.loads((folder / persist.VECTOR_FILE).read_text())
    doc["layers"] = [2, 2]
    (folder / persist.VECTOR_FILE).write_text(json.dumps(doc))
    with pytest.raises(SteeringFileError, match="more than once"):
        so.load(folder)


def _deflated_copy(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def test_zip_bombs_are_refused_before_decompression(tmp_path: Path) -> None:
    n = 10 << 20  # 40 MiB of float32 zeros, a few tens of KB compressed
    npz = tmp_path / "bomb.npz"
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("layer_1.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
        chunk = bytes(1 << 22)
        for _ in range(n * 4 // len(chunk)):  # exactly n values
            f.write(chunk)
    assert npz.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(SteeringFileError, match="expands to|at most"):
            so.load(npz)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes allocated while refusing the file"
    plain = tmp_path / "plain.pt"
    torch.save({1: torch.zeros(n)}, plain)
    pt = tmp_path / "bomb.pt"
    _deflated_copy(plain, pt)
    plain.unlink()
    assert pt.stat().st_size < 1 << 20
    with pytest.raises(SteeringFileError, match="expands to"):
        so.load(pt)


def test_values_that_overflow_the_model_dtype_are_refused(tmp_path: Path, tokenizer: Any) -> None:
    model = make_tiny_model("llama", len(tokenizer))
    path = tmp_path / "huge"
    so.save(so.SteeringVector({1: torch.full((D,), 1e300, dtype=torch.float64)}), path)
    assert so.load(path).layer_activations[1].dtype == torch.float64  # finite where it is stored
    with pytest.raises(ValueError, match="not finite in float32"):
        so.load(path, model=model)
    small = tmp_path / "small"
    so.save(so.SteeringVector({1: torch.full((D,), 1e5)}), small)
    so.load(small, model=model)
    with pytest.raises(ValueError, match="not finite in float16"):
        so.load(small, model=model.half())
    # the command line checks the values it will add: the vector times its multiplier, in the model's dtype
    from steering_opt.cli_commands import check_vectors

    args = argparse.Namespace(allow_model_mismatch=False, model="tiny")
    with pytest.raises(ValueError, match="not finite in float16"):
        check_vectors([("v", _vec(layer=1), 1e6)], model, args)
    # and so does apply(), for a vector that never went through load(model=...)
    huge = so.load(path)
    with pytest.raises(ValueError, match="not finite in float32"):
        with huge.apply(model.float()):
            pass
    with pytest.raises(ValueError, match=r"\* multiplier.*not finite in float32"):
        with so.SteeringVector({1: torch.full((D,), 1e30)}).apply(model, multiplier=1e10):
            pass
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_set_naming_a_member_twice_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    so.save({"a": _vec(), "b": _vec(-1.0)}, folder)
    manifest = folder / persist.SET_FILE
    doc = json.loads(manifest.read_text())
    first = doc["vectors"][0]
    for entries in ([first] * 20_000, [first, {"name": "c", "path": first["path"]}]):
        doc["vectors"] = entries
        manifest.write_text(json.dumps(doc))
        start = time.perf_counter()
        with pytest.raises(SteeringFileError, match="more than once"):
            so.load(folder)
        assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------------------------- input limits


def test_jsonl_reader_refuses_devices_and_endless_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    if Path("/dev/zero").is_char_device():
        assert main(["optimize", "--datapoints", "/dev/zero", "--layer", "1", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a regular file" in err[0], err
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "a", "dst_completions": ["b"]}\n' + "x" * 5000 + "\n")
    with pytest.raises(jsonl.JSONLError, match=r"long.jsonl:2: the line is longer than 1,000 bytes"):
        so.load_datapoints(long)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short\n" + "y" * 5000 + "\n")
    from steering_opt.cli_args import read_prompts_file

    with pytest.raises(jsonl.JSONLError, match="longer than"):
        read_prompts_file(str(prompts))


class _Spy:
    """A tokenizer that records the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.lengths = tokenizer, []  # type: ignore[var-annotated]

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_a_prompt_that_cannot_fit_is_refused_before_tokenising(tokenizer: Any) -> None:
    spy = _Spy(tokenizer)
    huge = TrainingDatapoint("Hello " * 400_000, dst_completions=[" there"])  # 2.4 M characters
    with pytest.raises(ValueError, match="characters long.*context of 8192 tokens"):
        tokenize_datapoints(spy, [TrainingDatapoint("Hi", dst_completions=["x"]), huge], max_length=8192)
    assert spy.lengths == []
    ok = tokenize_datapoints(spy, [TrainingDatapoint("Hello " * 100, dst_completions=[" there"])], max_length=8192)
    assert len(ok) == 1 and spy.lengths


def test_cli_errors_are_one_short_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["generate", "--prompt", "hi", "--temperature", "1e-300"], "--temperature"),
        (["generate", "--prompt", "hi", "--seed", str(2**70)], "--seed"),
        (["generate", "--prompt", "hi", "--seed", "abc"], "--seed"),
        (["generate", "--prompt", "hi", "--top-k", "7" * 300_000], "--top-k"),
        (["optimize", "--prompt", "a", "--dst", "b", "--layer", *["1"] * 100_000, "--out", str(tmp_path / "o")],
         "--layer"),
        (["generate", "--prompt", "hi", "--vector", *["v"] * 100_000], "--vector"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv[:4]
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and len(err) < 1200, (argv[:4], err[:300], len(err))
    so.save(_vec(), tmp_path / "vec")

    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("CUDA error: something\nline two\nline three")

    monkeypatch.setattr(persist, "load", boom)
    assert main(["info", str(tmp_path / "vec")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "RuntimeError: CUDA error" in lines[0], lines


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_refuses_a_prompt_longer_than_the_context(tiny_model_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("word " * 40_000 + "\n")  # 200,000 characters: more than 1024 tokens can hold
    start = time.perf_counter()
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(prompts), "--no-progress"]) == 2
    assert time.perf_counter() - start < 30
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("loading ")]
    assert len(lines) == 1 and "context of 1024 tokens" in lines[0], lines
    prompts.write_text("word " * 1500 + "\n")  # few enough characters, but more than 1024 tokens
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(prompts), "--no-progress"]) == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("loading ")]
    assert len(lines) == 1 and "longer than the model's context (1024 tokens)" in lines[0], lines
