"""steering_opt.arch: site map, hook arguments, layer resolution, fallback, overrides, truncation."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from conftest import ARCHS, SLIDING_OVERRIDES, TINY_HIDDEN, TINY_LAYERS, make_tiny_model
from torch import nn

from steering_opt import arch

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello!", "Steering vectors move activations."]

#: arch -> (path to the blocks, {site: attribute of a block}) written out independently of arch.py.
EXPECTED: dict[str, tuple[Callable[[nn.Module], nn.ModuleList], dict[str, str]]] = {}
_LLAMA_EXPECTED = {
    "self_attn": "self_attn",
    "mlp": "mlp",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}
for _a in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"):
    EXPECTED[_a] = (lambda m: m.model.layers, _LLAMA_EXPECTED)
EXPECTED["gemma2"] = (
    lambda m: m.model.layers,
    {**_LLAMA_EXPECTED, "post_attention_layernorm": "pre_feedforward_layernorm"},
)
EXPECTED["gpt2"] = (
    lambda m: m.transformer.h,
    {"self_attn": "attn", "mlp": "mlp", "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"},
)
EXPECTED["gpt_neox"] = (
    lambda m: m.gpt_neox.layers,
    {
        "self_attn": "attention",
        "mlp": "mlp",
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
    },
)
EXPECTED_PATHS = {a: "model.layers" for a in ARCHS} | {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def _arch_name(model: nn.Module) -> str:
    return model.config.model_type


def _batch(tok) -> dict[str, torch.Tensor]:
    return dict(tok(TEXTS, padding=True, return_tensors="pt"))


# ------------------------------------------------------------------------------------ site map


def test_archs_covered() -> None:
    assert {"llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox"} <= set(ARCHS)
    assert set(ARCHS) <= set(arch.ARCHITECTURES)
    for spec in arch.ARCHITECTURES.values():
        assert set(arch.SITES) <= set(spec.sites)


def test_site_map(tiny_model: nn.Module) -> None:
    name = _arch_name(tiny_model)
    get_expected_blocks, attrs = EXPECTED[name]
    expected_blocks = get_expected_blocks(tiny_model)
    bl = arch.find_block_list(tiny_model)
    assert bl.blocks is expected_blocks and arch.get_blocks(tiny_model) is expected_blocks
    assert bl.path == EXPECTED_PATHS[name]
    assert getattr(bl.parent, bl.attr) is expected_blocks
    assert arch.num_layers(tiny_model) == TINY_LAYERS
    assert arch.hidden_size(tiny_model) == TINY_HIDDEN
    assert set(arch.SITES) <= set(arch.available_sites(tiny_model))
    modules = dict(tiny_model.named_modules())
    for layer in range(TINY_LAYERS):
        block = expected_blocks[layer]
        assert arch.get_site_module(tiny_model, layer) is block
        assert arch.get_site_module(tiny_model, layer - TINY_LAYERS, "decoder_block") is block
        assert arch.site_path(tiny_model, layer) == f"{EXPECTED_PATHS[name]}.{layer}"
        for site, attr in attrs.items():
            module = arch.get_site_module(tiny_model, layer, site)
            assert module is getattr(block, attr), (name, layer, site)
            assert arch.get_site_module(tiny_model, layer - TINY_LAYERS, site) is module
            path = arch.site_path(tiny_model, layer, site)
            assert path == f"{EXPECTED_PATHS[name]}.{layer}.{attr}"
            assert modules[path] is module


def test_fingerprint(tiny_model: nn.Module) -> None:
    fp = arch.model_fingerprint(tiny_model)
    assert fp["model_type"] == _arch_name(tiny_model)
    assert fp["architecture"] == type(tiny_model).__name__
    assert fp["hidden_size"] == TINY_HIDDEN and fp["num_layers"] == TINY_LAYERS
    assert set(fp) == {"model_type", "architecture", "hidden_size", "num_layers", "name_or_path"}


def test_base_model_without_lm_head(tiny_llama: nn.Module) -> None:
    base = tiny_llama.model  # LlamaModel: model_type "llama", blocks at "layers"
    bl = arch.find_block_list(base)
    assert bl.blocks is tiny_llama.model.layers and bl.path == "layers"
    assert arch.get_site_module(base, -1, "mlp") is tiny_llama.model.layers[-1].mlp


# ---------------------------------------------------------------------------------- pre-hooks


def test_pre_hook_sees_hidden_states(tiny_model: nn.Module, left_tokenizer) -> None:
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(TINY_LAYERS):

        def grab(module, args, kwargs, layer=layer):
            seen[layer] = arch.get_hidden_states(args, kwargs).detach().clone()

        module = arch.get_site_module(tiny_model, layer)
        handles.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            out = tiny_model(**_batch(left_tokenizer), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert len(out.hidden_states) == TINY_LAYERS + 1
    for layer in range(TINY_LAYERS):
        assert torch.equal(seen[layer], out.hidden_states[layer]), layer


def _add_hook(vec: torch.Tensor):
    def hook(module, args, kwargs):
        h = arch.get_hidden_states(args, kwargs)
        return arch.replace_hidden_states(args, kwargs, h + vec)

    return hook


def test_zero_vector_is_exact_and_nonzero_changes(tiny_model: nn.Module, right_tokenizer) -> None:
    batch = _batch(right_tokenizer)
    with torch.no_grad():
        ref = tiny_model(**batch, use_cache=False).logits
    for layer in range(TINY_LAYERS):
        block = arch.get_site_module(tiny_model, layer)
        for vec, same in ((torch.zeros(TINY_HIDDEN), True), (torch.full((TINY_HIDDEN,), 0.5), False)):
            handle = block.register_forward_pre_hook(_add_hook(vec), with_kwargs=True)
            try:
                with torch.no_grad():
                    logits = tiny_model(**batch, use_cache=False).logits
            finally:
                handle.remove()
            assert torch.equal(logits, ref) is same, (layer, same)


def test_hidden_state_helpers() -> None:
    h, new, mask = torch.ones(2), torch.zeros(2), torch.ones(1)
    assert arch.get_hidden_states((h, mask), {}) is h
    assert arch.get_hidden_states((), {"hidden_states": h, "x": 1}) is h
    args, kwargs = arch.replace_hidden_states((h, mask), {"x": 1}, new)
    assert args[0] is new and args[1] is mask and kwargs == {"x": 1}
    kw_in = {"hidden_states": h, "x": 1}
    args, kwargs = arch.replace_hidden_states((), kw_in, new)
    assert args == () and kwargs["hidden_states"] is new and kw_in["hidden_states"] is h
    with pytest.raises(ValueError, match="no hidden states"):
        arch.get_hidden_states((), {"x": 1})
    with pytest.raises(ValueError, match="no hidden states"):
        arch.replace_hidden_states((), {}, new)
    assert arch.get_output_hidden_states(h) is h
    assert arch.get_output_hidden_states((h, None)) is h
    assert arch.replace_output_hidden_states(h, new) is new
    assert arch.replace_output_hidden_states((h, None), new) == (new, None)


# ------------------------------------------------------------------------------- layer errors


def test_resolve_layer(tiny_llama: nn.Module) -> None:
    n = TINY_LAYERS
    for layer in range(-n, n):
        assert arch.resolve_layer(tiny_llama, layer) == layer % n
    assert arch.resolve_layer(tiny_llama, -1) == n - 1
    assert type(arch.resolve_layer(tiny_llama, torch.tensor(1).numpy()[()])) is int  # numpy integer
    with pytest.raises(
        ValueError, match=rf"^layer={n} is out of range for a model with {n} layers \(valid: -{n}\.\.{n - 1}\)$"
    ):
        arch.resolve_layer(tiny_llama, n)
    with pytest.raises(ValueError, match=rf"^start=-{n + 1} is out of range .* \(valid: -{n}\.\.{n - 1}\)$"):
        arch.resolve_layer(tiny_llama, -n - 1, name="start")
    for bad in (1.0, True, "1", None, [1]):
        with pytest.raises(TypeError, match="^layer must be an int"):
            arch.resolve_layer(tiny_llama, bad)
    with pytest.raises(TypeError, match="^steer_layer must be an int"):
        arch.resolve_layer(tiny_llama, 2.5, name="steer_layer")
    with pytest.raises(ValueError, match="out of range"):
        arch.get_site_module(tiny_llama, 40, "mlp")
    with pytest.raises(TypeError):
        arch.get_site_module(tiny_llama, False)


def test_unknown_site(tiny_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="Unknown site 'resid_mid'") as info:
        arch.get_site_module(tiny_model, 0, "resid_mid")
    for site in arch.SITES:
        assert repr(site) in str(info.value)
    with pytest.raises(ValueError, match="Unknown site"):
        arch.site_path(tiny_model, 0, "resid_mid")


# ------------------------------------------------------------------------ fallback / overrides


class Wrapper(nn.Module):
    """A model type the table does not know: a tiny Llama inside, a config with a new model_type."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.config = copy.deepcopy(inner.config)
        self.config.model_type = "my_custom"
        self.config.architectures = None
        self.head_stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(6)])  # longer, wrong length
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_fallback_finds_blocks(tiny_llama: nn.Module) -> None:
    wrapped = Wrapper(tiny_llama)
    assert "my_custom" not in arch.ARCHITECTURES
    bl = arch.find_block_list(wrapped)
    assert bl.blocks is tiny_llama.model.layers and bl.path == "inner.model.layers"
    assert bl.parent is tiny_llama.model and bl.attr == "layers"
    assert arch.num_layers(wrapped) == TINY_LAYERS and arch.hidden_size(wrapped) == TINY_HIDDEN
    assert set(arch.available_sites(wrapped)) == set(arch.SITES)
    assert arch.get_site_module(wrapped, -1, "mlp") is tiny_llama.model.layers[-1].mlp
    assert arch.get_site_module(wrapped, 1, "self_attn") is tiny_llama.model.layers[1].self_attn
    assert arch.site_path(wrapped, 2, "input_layernorm") == "inner.model.layers.2.input_layernorm"
    fp = arch.model_fingerprint(wrapped)
    assert fp["model_type"] == "my_custom" and fp["architecture"] == "Wrapper" and fp["num_layers"] == TINY_LAYERS
    with pytest.raises(NotImplementedError):
        with arch.truncated_blocks(wrapped, 1):
            pass


def test_fallback_without_config_and_errors() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)])  # not homogeneous
            self.stack = nn.ModuleList([nn.Linear(8, 8) for _ in range(5)])

    plain = Plain()
    assert arch.get_blocks(plain) is plain.stack
    with pytest.raises(arch.ArchitectureError, match="hidden size"):
        arch.hidden_size(plain)  # no config and no get_input_embeddings()
    assert arch.available_sites(plain) == ("decoder_block",)

    class NoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="layer_config") as info:
        arch.find_block_list(NoBlocks())
    assert isinstance(info.value, arch.ArchitectureError) and "ModuleList" in str(info.value)


def test_fallback_respects_config_layer_count(tiny_llama: nn.Module) -> None:
    wrapped = Wrapper(tiny_llama)
    wrapped.config.num_hidden_layers = 6  # now only head_stack has the configured length
    assert arch.get_blocks(wrapped) is wrapped.head_stack
    wrapped.config.num_hidden_layers = 7  # nothing matches
    with pytest.raises(arch.ArchitectureError, match=r"length 7 .*layer_config="):
        arch.get_blocks(wrapped)


def test_layer_config_overrides(tiny_llama: nn.Module) -> None:
    layers = tiny_llama.model.layers
    assert arch.get_site_module(tiny_llama, 1, layer_config="model.layers.{num}") is layers[1]
    assert arch.get_site_module(tiny_llama, -1, layer_config="model.layers.{num}.mlp") is layers[-1].mlp
    assert (
        arch.site_path(tiny_llama, -1, layer_config="model.layers.{num}.mlp") == f"model.layers.{TINY_LAYERS - 1}.mlp"
    )

    def pick(model: nn.Module, num: int) -> nn.Module:
        return model.model.layers[num].self_attn

    assert arch.get_site_module(tiny_llama, 2, layer_config=pick) is layers[2].self_attn
    assert arch.site_path(tiny_llama, 2, layer_config=pick) == "model.layers.2.self_attn"
    with pytest.raises(ValueError, match="cannot be combined"):
        arch.get_site_module(tiny_llama, 1, "mlp", layer_config="model.layers.{num}")
    with pytest.raises(ValueError, match="no submodule 'model.blocks.1'"):
        arch.get_site_module(tiny_llama, 1, layer_config="model.blocks.{num}")
    with pytest.raises(ValueError, match=r"\{num\}"):
        arch.get_site_module(tiny_llama, 1, layer_config="model.layers.{layer}")
    with pytest.raises(TypeError, match="not an nn.Module"):
        arch.get_site_module(tiny_llama, 1, layer_config=lambda model, num: "nope")
    with pytest.raises(ValueError, match="out of range"):
        arch.get_site_module(tiny_llama, TINY_LAYERS, layer_config="model.layers.{num}")


def test_layer_config_when_blocks_cannot_be_found() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

    odd = Odd()
    with pytest.raises(arch.ArchitectureError):
        arch.get_site_module(odd, 0)
    assert arch.get_site_module(odd, 1, layer_config=lambda m, n: [m.a, m.b][n]) is odd.b
    assert arch.get_site_module(odd, 0, layer_config="a") is odd.a  # a template without {num} is allowed
    with pytest.raises(ValueError, match="negative"):
        arch.get_site_module(odd, -1, layer_config=lambda m, n: [m.a, m.b][n])


# --------------------------------------------------------------------------------- truncation


def _snapshot(model: nn.Module) -> tuple:
    bl = arch.find_block_list(model)
    return (
        bl.blocks,
        list(bl.blocks),
        model.config.to_dict(),
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model: nn.Module, snap: tuple) -> None:
    blocks, members, cfg, state = snap
    bl = arch.find_block_list(model)
    assert bl.blocks is blocks and list(bl.blocks) == members
    assert model.config.to_dict() == cfg
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(torch.equal(new_state[k], v) for k, v in state.items())


@pytest.mark.parametrize("variant", ["default", "sliding"])
def test_truncated_blocks_is_exact(arch_name: str, variant: str, left_tokenizer) -> None:
    if variant == "sliding" and arch_name not in SLIDING_OVERRIDES:
        pytest.skip(f"{arch_name} has no sliding-window attention")
    overrides = SLIDING_OVERRIDES[arch_name] if variant == "sliding" else {}
    model = make_tiny_model(arch_name, len(left_tokenizer), **overrides)
    batch = _batch(left_tokenizer)  # left padding: masks and positions must survive truncation
    snap = _snapshot(model)
    blocks = arch.get_blocks(model)
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["h"] = arch.get_hidden_states(args, kwargs).detach().clone()

    def put(module, args, kwargs):
        return arch.replace_hidden_states(args, kwargs, captured.pop("h"))

    for start in range(TINY_LAYERS):
        for use_cache in (False, True):
            handle = blocks[start].register_forward_pre_hook(grab, with_kwargs=True)
            with torch.no_grad():
                ref = model(**batch, use_cache=use_cache).logits
            handle.remove()
            handle = blocks[start].register_forward_pre_hook(put, with_kwargs=True)
            try:
                with arch.truncated_blocks(model, start) as short, torch.no_grad():
                    assert len(short) == TINY_LAYERS - start and short[0] is blocks[start]
                    out = model(**batch, use_cache=use_cache).logits
            finally:
                handle.remove()
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"{arch_name} start={start}")
            _assert_unchanged(model, snap)


@pytest.mark.parametrize("arch_with_layer_types", ["gemma2", "qwen2"])
def test_layer_types_rotation_is_needed(
    arch_with_layer_types: str, left_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard against a vacuous equivalence test: without rotating ``config.layer_types`` a truncated
    forward of a model with sliding-window layers gives blocks the wrong mask and differs."""
    model = make_tiny_model(arch_with_layer_types, len(left_tokenizer), **SLIDING_OVERRIDES[arch_with_layer_types])
    assert len(set(model.config.layer_types)) == 2
    batch = _batch(left_tokenizer)
    blocks, start = arch.get_blocks(model), 1
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["h"] = arch.get_hidden_states(args, kwargs)

    def put(module, args, kwargs):
        return arch.replace_hidden_states(args, kwargs, captured["h"])

    handle = blocks[start].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        ref = model(**batch, use_cache=False).logits
    handle.remove()
    handle = blocks[start].register_forward_pre_hook(put, with_kwargs=True)
    monkeypatch.setattr(arch, "PER_LAYER_CONFIG_ATTRS", ())
    try:
        with torch.no_grad(), arch.truncated_blocks(model, start):
            out = model(**batch, use_cache=False).logits
    finally:
        handle.remove()
    assert not torch.allclose(out, ref, atol=1e-3)


def test_truncated_blocks_restores_on_error_and_rejects_misuse(tiny_llama: nn.Module) -> None:
    snap = _snapshot(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"):
        with arch.truncated_blocks(tiny_llama, -2) as short:
            assert len(short) == 2
            raise RuntimeError("boom")
    _assert_unchanged(tiny_llama, snap)
    with arch.truncated_blocks(tiny_llama, 1):
        with pytest.raises(NotImplementedError, match="nesting"):
            with arch.truncated_blocks(tiny_llama, 1):
                pass
    _assert_unchanged(tiny_llama, snap)
    with pytest.raises(ValueError, match=r"^start=4 is out of range"):
        with arch.truncated_blocks(tiny_llama, TINY_LAYERS):
            pass
    _assert_unchanged(tiny_llama, snap)


def test_embedded_model_layout_and_truncation(embedded_model: nn.Module, embedded_tokenizer) -> None:
    model = embedded_model
    assert arch.num_layers(model) == 30 and arch.hidden_size(model) == 576
    fp = arch.model_fingerprint(model)
    assert fp["model_type"] == "llama" and fp["num_layers"] == 30 and fp["hidden_size"] == 576
    assert arch.get_site_module(model, -1, "mlp") is model.model.layers[29].mlp
    tok = copy.deepcopy(embedded_tokenizer)
    tok.padding_side = "left"
    batch = dict(tok(TEXTS[:2], padding=True, return_tensors="pt"))
    start, block = 12, arch.get_site_module(model, 12)
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["h"] = arch.get_hidden_states(args, kwargs)

    def put(module, args, kwargs):
        return arch.replace_hidden_states(args, kwargs, captured["h"])

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = model(**batch, use_cache=False).logits
    finally:
        handle.remove()
    handle = block.register_forward_pre_hook(put, with_kwargs=True)
    try:
        with torch.no_grad(), arch.truncated_blocks(model, start):
            out = model(**batch, use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert arch.num_layers(model) == 30


@pytest.fixture(params=ARCHS)
def arch_name(request: pytest.FixtureRequest) -> str:
    return request.param
