"""Contrastive training: parity of extraction and aggregators with hand computations, padding and batching
independence, sites, chat templates, argument checking, model left untouched, and (on the embedded model)
why the default token choice avoids the first-token massive activation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, make_tiny_model

from steering_opt import arch
from steering_opt.compat.rotalabs_steer import ActivationHook
from steering_opt.contrastive import (
    ContrastPair,
    ablation_operator,
    ablation_then_addition_operator,
    addition_operator,
    aggregate_activations,
    extract_activations,
    logistic_aggregator,
    mean_aggregator,
    pca_aggregator,
    projection_operator,
    tokenize_text,
    train_steering_vector,
)
from steering_opt.vector import SteeringVector

PAIRS = [
    ("The capital of England is London", "The capital of England is Beijing"),
    ("I love you so much, you are wonderful", "I hate it"),
    ("Yes", "No, absolutely not, never ever again"),
    ContrastPair("Thank you kindly for your help!", "Whatever."),
]
CHAT_PAIRS = [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, lovely to meet you!"}],
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]),
    ([{"role": "user", "content": "Can you help me?"}],  # ends with a user turn: generation prompt appended
     [{"role": "user", "content": "Help. Now."}]),
]


def _state(model: torch.nn.Module) -> tuple:
    """Everything a call must leave as it was: flags, modes, hooks, weights."""
    return (
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        [p.detach().clone() for p in model.parameters()],
    )


def _same_state(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def _hand_last_token(model, tokenizer, text, layer) -> torch.Tensor:
    ids, _ = tokenize_text(tokenizer, text)
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return hs[layer][0, -1].float()


# ------------------------------------------------------------------------------------ parity


def test_mean_aggregator_equals_hand_mean_of_differences(tiny_llama, tokenizer):
    layers = [0, 2, 3]
    vec = train_steering_vector(tiny_llama, tokenizer, PAIRS, layers=layers, batch_size=3)
    assert isinstance(vec, SteeringVector) and vec.layers == layers and vec.layer_type == "decoder_block"
    assert vec.metadata["aggregator"] == "mean" and vec.metadata["n_pairs"] == len(PAIRS)
    for layer in layers:
        diffs = []
        for pair in PAIRS:
            pos, neg = (pair.positive, pair.negative) if isinstance(pair, ContrastPair) else pair
            diffs.append(_hand_last_token(tiny_llama, tokenizer, pos, layer)
                         - _hand_last_token(tiny_llama, tokenizer, neg, layer))
        torch.testing.assert_close(vec.layer_activations[layer], torch.stack(diffs).mean(0), atol=1e-5, rtol=1e-5)


def test_pca_aggregator_equals_svd_by_hand():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    neg = torch.randn(12, 16, generator=g)
    pos = neg + 3.0 * direction + 0.3 * torch.randn(12, 16, generator=g)
    got = pca_aggregator()(pos, neg)
    # by hand: PCA (centred, via the covariance eigenvector) of the symmetrised differences {d} ∪ {-d}
    d = (pos - neg).double()
    sym = torch.cat([d, -d])
    cov = (sym - sym.mean(0)).T @ (sym - sym.mean(0)) / (len(sym) - 1)
    evals, evecs = torch.linalg.eigh(cov)
    u = evecs[:, -1]
    u = u if float((d @ u).mean()) >= 0 else -u  # sign rule: from negative to positive
    torch.testing.assert_close(got.double(), u, atol=1e-6, rtol=0)
    assert abs(float(got.norm()) - 1) < 1e-6
    assert float((d @ got.double()).mean()) > 0
    # swapping the sides flips it; the sign rule applies whichever sign the SVD returns
    torch.testing.assert_close(pca_aggregator()(neg, pos), -got, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="all positive-negative differences are zero"):
        pca_aggregator()(pos, pos)


def _newton_logistic(x: torch.Tensor, y: torch.Tensor, C: float) -> torch.Tensor:
    """Minimise 0.5|w|^2 + C sum log(1 + exp(-y (x w + b))) by Newton's method (b unregularised)."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    theta = torch.zeros(xa.shape[1], dtype=x.dtype)
    reg = torch.eye(xa.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0
    for _ in range(50):
        z = y * (xa @ theta)
        s = torch.sigmoid(-z)
        grad = reg @ theta - C * (xa * (y * s)[:, None]).sum(0)
        hess = reg + C * xa.T @ (xa * (s * (1 - s))[:, None])
        theta = theta - torch.linalg.solve(hess, grad)
    return theta[:-1]


def test_logistic_aggregator_equals_newton_solution():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(15, 6, generator=g, dtype=torch.float64) + 0.7
    neg = torch.randn(11, 6, generator=g, dtype=torch.float64) - 0.4
    y = torch.cat([torch.ones(15), -torch.ones(11)]).double()
    for C in (1.0, 0.1):
        want = _newton_logistic(torch.cat([pos, neg]), y, C)
        got = logistic_aggregator(C=C)(pos.float(), neg.float())
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    unit = logistic_aggregator(normalize=True)(pos.float(), neg.float())
    assert abs(float(unit.norm()) - 1) < 1e-6 and float(unit @ (pos.mean(0) - neg.mean(0)).float()) > 0
    with pytest.raises(ValueError, match="`C` must be a number > 0"):
        logistic_aggregator(C=0)


def test_aggregators_and_custom_function_through_train(tiny_llama, tokenizer):
    pos, neg = extract_activations(tiny_llama, tokenizer, PAIRS, layers=[1, -1])
    assert sorted(pos) == [1, 3] and pos[1].shape == (len(PAIRS), 64) and pos[1].dtype == torch.float32
    for agg in (mean_aggregator(), pca_aggregator(), logistic_aggregator()):
        vec = train_steering_vector(tiny_llama, tokenizer, PAIRS, layers=[1, -1], aggregator=agg)
        manual = aggregate_activations(pos, neg, agg)
        for layer in (1, 3):
            torch.testing.assert_close(vec.layer_activations[layer], manual[layer], atol=1e-5, rtol=1e-5)

    def norm_mean(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        m = (p - n).mean(0)
        return m / m.norm()

    vec = train_steering_vector(tiny_llama, tokenizer, PAIRS, layers=[1], aggregator=norm_mean)
    assert abs(float(vec.layer_activations[1].norm()) - 1) < 1e-5 and vec.metadata["aggregator"] == "norm_mean"
    # lists of (d,) tensors (steering-vectors' extract format) are accepted too
    lists = aggregate_activations({1: list(pos[1])}, {1: list(neg[1])})
    torch.testing.assert_close(lists[1], (pos[1] - neg[1]).mean(0))


@pytest.mark.parametrize("arch_name", ARCHS)
def test_batching_and_padding_side_do_not_change_activations(arch_name, tokenizer):
    model = make_tiny_model(arch_name, len(tokenizer))
    samples = PAIRS + CHAT_PAIRS
    ref_pos, ref_neg = extract_activations(model, tokenizer, samples, batch_size=1)
    for side in ("left", "right"):
        tok = copy.deepcopy(tokenizer)
        tok.padding_side = side
        pos, neg = extract_activations(model, tok, samples, batch_size=8)
        for layer in ref_pos:
            torch.testing.assert_close(pos[layer], ref_pos[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(neg[layer], ref_neg[layer], atol=1e-5, rtol=1e-5)
    # decoder_block layer L is hidden_states[L]: the residual stream entering block L
    text = PAIRS[1][0]
    for layer in ref_pos:
        torch.testing.assert_close(ref_pos[layer][1], _hand_last_token(model, tokenizer, text, layer), atol=1e-5,
                                   rtol=1e-5)


def test_read_token_index_int_and_callable(tiny_llama, tokenizer):
    samples = [PAIRS[0], PAIRS[1], ("Thank you kindly", "No")]  # "No" is one token: index 1 would be out of range
    first, _ = extract_activations(tiny_llama, tokenizer, samples, layers=[2], read_token_index=0, batch_size=3)
    second, _ = extract_activations(tiny_llama, tokenizer, samples[:2], layers=[2], read_token_index=1, batch_size=3)
    by_fn, _ = extract_activations(tiny_llama, tokenizer, samples[:2], layers=[2], batch_size=2,
                                   read_token_index=lambda text: 0 if text.startswith("The") else 1)
    for i, (pos, _neg) in enumerate(samples):
        ids, _ = tokenize_text(tokenizer, pos)
        with torch.no_grad():
            hs = tiny_llama(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(first[2][i], hs[0], atol=1e-5, rtol=1e-5)
        if i < 2:
            torch.testing.assert_close(second[2][i], hs[1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(by_fn[2][i], hs[0] if pos.startswith("The") else hs[1], atol=1e-5, rtol=1e-5)


def test_chat_template_rendering_and_read_position(tiny_llama, tokenizer):
    msgs = CHAT_PAIRS[0][0]
    ids, rendered = tokenize_text(tokenizer, msgs)
    assert rendered.endswith("Hello, lovely to meet you!")  # the answer stays open: last token is its last token
    assert rendered == tokenizer.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    user_only, rendered_user = tokenize_text(tokenizer, CHAT_PAIRS[1][0])
    assert rendered_user == tokenizer.apply_chat_template(CHAT_PAIRS[1][0], tokenize=False, add_generation_prompt=True)
    pos, _ = extract_activations(tiny_llama, tokenizer, CHAT_PAIRS, layers=[1])
    with torch.no_grad():
        hs = tiny_llama(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0, -1]
    torch.testing.assert_close(pos[1][0], hs, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ sites


def _hand_site(model, site: str, layer: int, ids: list[int]) -> torch.Tensor:
    """The last-token activation at the module the architecture map names, read by an independent hook."""
    module = arch.get_site_module(model, layer, site)
    seen: list[torch.Tensor] = []
    if site == "decoder_block":
        h = module.register_forward_pre_hook(lambda m, a, k: seen.append(arch.get_hidden_states(a, k)),
                                             with_kwargs=True)
    else:
        h = module.register_forward_hook(lambda m, a, o: seen.append(arch.get_output_hidden_states(o)))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    return seen[0][0, -1].float()


@pytest.mark.parametrize("arch_name", ARCHS)
def test_each_layer_type_reads_and_steers_the_module_the_arch_map_names(arch_name, tokenizer):
    model = make_tiny_model(arch_name, len(tokenizer))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms start as identity maps: make every site's value distinct
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ids, _ = tokenize_text(tokenizer, PAIRS[0][0])
    seen_values = []
    for site in arch.SITES:
        pos, _ = extract_activations(model, tokenizer, PAIRS[:1], layers=[1, 2], layer_type=site)
        for layer in (1, 2):
            torch.testing.assert_close(pos[layer][0], _hand_site(model, site, layer, ids), atol=1e-5, rtol=1e-5)
        seen_values.append(pos[2][0])
        # a vector applied at (site, layer) moves exactly that tensor by v
        v = torch.randn(64, generator=torch.Generator().manual_seed(3))
        with SteeringVector({2: v}, layer_type=site).apply(model):
            steered, _ = extract_activations(model, tokenizer, PAIRS[:1], layers=[2], layer_type=site)
        torch.testing.assert_close(steered[2][0] - pos[2][0], v, atol=1e-4, rtol=1e-4)
    assert all(not torch.allclose(a, b) for i, a in enumerate(seen_values) for b in seen_values[i + 1:])


def test_layer_config_overrides(tokenizer):
    model = make_tiny_model("gpt2", len(tokenizer))
    gpt_layer_config = {  # steering-vectors' documented GPT-2 config
        "decoder_block": "transformer.h.{num}",
        "self_attn": "transformer.h.{num}.attn",
        "mlp": "transformer.h.{num}.mlp",
        "input_layernorm": "transformer.h.{num}.ln_1",
        "post_attention_layernorm": "transformer.h.{num}.ln_2",
    }
    for site in arch.SITES:
        want, _ = extract_activations(model, tokenizer, PAIRS[:2], layers=[1, 3], layer_type=site)
        got, _ = extract_activations(model, tokenizer, PAIRS[:2], layers=[1, 3], layer_type=site,
                                     layer_config=gpt_layer_config)
        for layer in want:
            torch.testing.assert_close(got[layer], want[layer])
    fn_cfg = {"mlp": lambda num: f"transformer.h.{num}.mlp"}  # callable num -> path
    got, _ = extract_activations(model, tokenizer, PAIRS[:2], layers=[1], layer_type="mlp", layer_config=fn_cfg)
    want, _ = extract_activations(model, tokenizer, PAIRS[:2], layers=[1], layer_type="mlp")
    torch.testing.assert_close(got[1], want[1])
    got, _ = extract_activations(model, tokenizer, PAIRS[:2], layers=[1], layer_type="mlp",
                                 layer_config="transformer.h.{num}.mlp")
    torch.testing.assert_close(got[1], want[1])
    with pytest.raises(ValueError, match="no submodule"):
        extract_activations(model, tokenizer, PAIRS[:2], layers=[1], layer_config={"decoder_block": "nope.{num}"})


def test_forward_stops_after_the_deepest_requested_layer(tiny_llama, tokenizer):
    ran: list[int] = []
    blocks = arch.get_blocks(tiny_llama)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        extract_activations(tiny_llama, tokenizer, PAIRS[:2], layers=[0, 1], batch_size=4)
        assert ran == [0]  # block 1's input is read before block 1 runs; nothing after it runs
        ran.clear()
        extract_activations(tiny_llama, tokenizer, PAIRS[:2], layers=[1], layer_type="mlp", batch_size=4)
        assert ran == [0]  # block 1 is interrupted inside, after its MLP
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ errors and state


def _count_forwards(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]
    handle = model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(training_samples=[]), ValueError, "`training_samples` is empty"),
        (dict(training_samples="abc"), TypeError, "`training_samples` must be a list"),
        (dict(training_samples=[("a", "b", "c")]), TypeError, r"`training_samples\[0\]` must be a \(positive"),
        (dict(training_samples=[("a", 3)]), TypeError, r"training_samples\[0\] \(negative\): expected a string"),
        (dict(training_samples=[("a", "")]), ValueError, r"training_samples\[0\] \(negative\): empty string"),
        (dict(training_samples=[("a", [{"role": "user"}])]), TypeError, "chat messages must be dicts"),
        (dict(layer_type="mlpp"), ValueError, "`layer_type` must be one of"),
        (dict(layers=[7]), ValueError, "layers=7 is out of range"),
        (dict(layers="1"), TypeError, "`layers` must be None, an int"),
        (dict(batch_size=0), ValueError, "`batch_size` must be an int >= 1"),
        (dict(read_token_index=50), ValueError, r"`read_token_index`=50 is out of range for training_samples\[0\]"),
        (dict(read_token_index="last"), TypeError, "`read_token_index` must be an int or a callable"),
        (dict(read_token_index=lambda t: "x"), TypeError, "`read_token_index` must be an int or a callable"),
        (dict(aggregator="mean"), TypeError, "`aggregator` must be a callable"),
        (dict(layer_type="pre_feedforward_layernorm"), ValueError, "`layer_type` must be one of"),
    ],
)
def test_bad_arguments_fail_before_any_forward(tiny_llama, tokenizer, kwargs, exc, match):
    before = _state(tiny_llama)
    calls, handle = _count_forwards(tiny_llama)
    args = dict(training_samples=PAIRS, layers=[1])
    args.update(kwargs)
    try:
        with pytest.raises(exc, match=match):
            train_steering_vector(tiny_llama, tokenizer, **args)
        if "layer_type" in kwargs:
            with pytest.raises((ValueError, TypeError)):
                extract_activations(tiny_llama, tokenizer, **args)
    finally:
        handle.remove()
    assert calls[0] == 0
    assert _same_state(before, _state(tiny_llama))


def test_model_state_restored_after_success_and_failures(tiny_llama, tokenizer):
    tiny_llama.train()
    for p in list(tiny_llama.parameters())[::2]:
        p.requires_grad_(False)
    before = _state(tiny_llama)
    train_steering_vector(tiny_llama, tokenizer, PAIRS, layers=[1, 2], batch_size=2)
    assert _same_state(before, _state(tiny_llama))

    # an aggregator returning the wrong shape: clear error, state intact
    with pytest.raises(ValueError, match=r"aggregator returned \(3,\) for layer 1; expected a tensor of shape \(64,\)"):
        train_steering_vector(tiny_llama, tokenizer, PAIRS, layers=[1], aggregator=lambda p, n: torch.zeros(3))
    assert _same_state(before, _state(tiny_llama))

    # a failure inside the forward (a user hook raising): our hooks are removed, flags/modes restored
    block = arch.get_blocks(tiny_llama)[0]

    def boom(m, a):
        raise RuntimeError("boom")

    h = block.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            extract_activations(tiny_llama, tokenizer, PAIRS, layers=[2])
    finally:
        h.remove()
    assert _same_state(before, _state(tiny_llama))


# ------------------------------------------------------------------------------------ operators


def test_operators_formulas():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 8, generator=g)
    v = torch.randn(8, generator=g)
    u = v / v.norm()
    proj = (h @ u)[..., None] * u
    torch.testing.assert_close(addition_operator()(h, v).expand_as(h), v.expand_as(h))
    torch.testing.assert_close(ablation_operator()(h, v), -proj)
    assert float(((h + ablation_operator()(h, v)) @ u).abs().max()) < 1e-5
    after = h + ablation_then_addition_operator()(h, v)
    torch.testing.assert_close(after @ u, torch.full((2, 5), float(v.norm())))  # projection is exactly v
    torch.testing.assert_close(projection_operator(-1.0)(h, v), ablation_operator()(h, v))
    torch.testing.assert_close(projection_operator(0.5)(h, 3 * v), 0.5 * proj)  # direction only
    torch.testing.assert_close(projection_operator(2.0, normalize=False)(h, v), 2.0 * (h @ v)[..., None] * v)
    for op in (ablation_operator(), ablation_then_addition_operator(), projection_operator()):
        assert torch.equal(op(h, torch.zeros(8)), torch.zeros_like(h))


def test_operators_in_apply_match_formulas(tiny_llama, tokenizer):
    vec = train_steering_vector(tiny_llama, tokenizer, PAIRS, layers=[2])
    v = vec.layer_activations[2]
    u = v / v.norm()
    ids = tokenizer(PAIRS[0][0], return_tensors="pt")

    def resid(**apply_kwargs):
        with vec.apply(tiny_llama, **apply_kwargs), ActivationHook(tiny_llama, [2], "residual", "all") as hook:
            tiny_llama(**ids)
        return hook.get_activations()[2][0]

    with ActivationHook(tiny_llama, [2], "residual", "all") as hook:
        tiny_llama(**ids)
    base = hook.get_activations()[2][0]
    torch.testing.assert_close(resid(multiplier=2.0), base + 2 * v)
    torch.testing.assert_close(resid(operator=ablation_operator()) @ u, torch.zeros(base.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(resid(operator=ablation_then_addition_operator(), multiplier=3.0) @ u,
                               torch.full((base.shape[0],), 3 * float(v.norm())), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(resid(operator=projection_operator(0.5)), base + 0.5 * (base @ u)[:, None] * u)

    def custom(act, vector):  # the steering-vectors README's example operator
        return -(act @ vector)[..., None] * vector / vector.norm() ** 2

    torch.testing.assert_close(resid(operator=custom), resid(operator=ablation_operator()), atol=1e-4, rtol=1e-5)
    with pytest.raises(TypeError, match="`operator` must be a callable"):
        vec.apply(tiny_llama, operator="ablate").__enter__()


# ------------------------------------------------------------------------------------ embedded model

POLITE = [
    "I would greatly appreciate it if you could explain the concept of machine learning to me when you have a moment.",
    "Would you be so kind as to share your thoughts on this approach? Thank you for your consideration.",
    "If it's not too much trouble, could you please clarify this point? I'd be most grateful for your insights.",
    "Could you please send me the report when you get a chance? Many thanks in advance.",
    "I'm so sorry to bother you, but would you mind helping me with this form?",
    "Thank you kindly for your patience; may I ask you to review my draft?",
]
DIRECT = ["Explain machine learning to me now.", "Tell me what you think about this approach.",
          "Clarify this point immediately.", "Send me the report.", "Help me with this form.", "Review my draft."]


def test_default_token_avoids_first_token_massive_activation(embedded_model, embedded_tokenizer):
    """DESIGN.md §6: at layer 15 the first token's residual norm is ~100x the others'. The blog's sequence-mean
    vector is then the first-token direction weighted by the length difference (it encodes length, not
    politeness); the default last-token vector is not dominated by it."""
    model, tok, layer = embedded_model, embedded_tokenizer, 15
    pairs = list(zip(POLITE, DIRECT))
    default = train_steering_vector(model, tok, pairs, layers=[layer], batch_size=6).layer_activations[layer]
    first, _ = extract_activations(model, tok, pairs, layers=[layer], read_token_index=0, batch_size=6)
    last, _ = extract_activations(model, tok, pairs, layers=[layer], batch_size=6)
    assert float(first[layer].norm(dim=-1).min()) > 50 * float(last[layer].norm(dim=-1).max())

    seq = {}  # the naive recipe: every token's activation, averaged over the sequence
    with ActivationHook(model, [layer], "residual", "all") as hook, torch.no_grad():
        for text in POLITE + DIRECT:
            model(**tok(text, return_tensors="pt"))
    for text, acts in zip(POLITE + DIRECT, hook.get_activations(concat=False)[layer]):
        seq[text] = acts[0].float()
    naive = (torch.stack([seq[t].mean(0) for t in POLITE]).mean(0)
             - torch.stack([seq[t].mean(0) for t in DIRECT]).mean(0))
    h0 = torch.stack([seq[t][0] for t in POLITE + DIRECT]).mean(0)
    u0 = h0 / h0.norm()

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    length_term = h0 * (sum(1 / len(seq[t]) for t in POLITE) / 6 - sum(1 / len(seq[t]) for t in DIRECT) / 6)
    assert cos(naive, u0) ** 2 > 0.99  # measured 0.9998: the naive vector is the first-token direction
    assert cos(naive, length_term) > 0.99  # ... scaled by mean(1/len) differences (measured 0.9999)
    assert float(naive.norm()) > 20 * float(default.norm())  # measured 2735 vs 47
    assert cos(default, u0) ** 2 < 0.5  # measured 0.16
