"""Does the steering work? Held-out generations, log-prob shifts, KL, perplexity, fluency and success.

One call::

    result = steering_opt.evaluate(model, tokenizer, vector, held_out_prompts, scorer="refusal",
                                   promote=["I'm sorry, but I can't help with that."], chat=True)
    result.summary            # success_rate, fluent_success_rate, kl, perplexity, margin_gain, ...
    result.records            # one dict per prompt (steered and unsteered text, every metric)
    result.to_pandas()        # if pandas is installed

Many steerings on the same prompts (a sweep) share the unsteered work through :class:`Evaluator`.

**Steering** (the ``steering`` argument everywhere): ``None`` (unsteered); a :class:`SteeringVector`
(additive, clamp, affine, contrastive — whatever produced it); ``(vector, strength)``; a list of these
(applied together); ``{layer: tensor}`` (e.g. from ``optimize_vectors``); or tutorial-style hooks
``[(layer, make_steering_hook_hf(v)), ...]``. ``multiplier`` scales every SteeringVector on top of its
own strength.

**Prompts**: plain strings, or chat conversations (lists of ``{"role", "content"}`` dicts) which get
the tokenizer's chat template with the generation prompt; ``chat=True`` turns plain strings into
one-user-turn conversations. Prompt text is tokenised with the tokenizer's special tokens and
completions without, exactly as in training.

**Metrics** (all log-probabilities in nats, natural log; coldness 1, i.e. the model's own distribution):

* ``promote_logprob`` / ``suppress_logprob``: mean over the given completions of ``Σ_t log p(y_t)``
  after each prompt, steered; ``margin = promote − suppress``; ``margin_gain = margin(steered) −
  margin(unsteered)`` (the log-odds the steering adds in favour of the promoted completions).
* ``kl``: mean over every token position of the neutral prompts of
  ``KL(p_unsteered ‖ p_steered) = Σ_v p_u(v) (log p_u(v) − log p_s(v))`` of the next-token
  distributions (0 when the steering changes nothing).
* ``perplexity``: of the steered generation under the *unsteered* model, ``exp(mean_t −log p(y_t))``
  over the generated tokens (per prompt; the summary pools all tokens: ``exp(Σ NLL / Σ tokens)``).
* ``distinct2``, ``repetition`` (seq-rep-4), ``real_words`` (fraction of real words of the target
  language, wordfreq): see :mod:`steering_opt.scorers`.
* ``success``: ``scorer(steered_text, prompt) >= 0.5``; ``fluent``: ``distinct2 >= min_distinct2`` and
  ``real_words >= min_real_words``; ``fluent_success``: both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import arch, validate
from .data import encode
from .hooks import attach, frozen_model, layer_hook_specs
from .passes import (
    Forward,
    Prompt,
    UpperBlocks,
    check_prompts,
    encode_prompts,
    format_prompt,
    generate_ids,
    logprob_batches,
    mean_kl,
    next_token_logprobs,
    planned_passes,
    recording,
    token_logprobs,
    upper_blocks,
)
from .progress import check_progress, overall
from .scorers import distinct_n, get_scorer, real_word_fraction, repetition_rate
from .vector import SteeringVector, check_multiplier

__all__ = [
    "DEFAULT_NEUTRAL_PROMPTS",
    "EvalResult",
    "Evaluator",
    "completion_logprobs",
    "evaluate",
    "format_prompt",
    "generate",
    "kl_divergence",
    "perplexity",
    "steering_context",
]

log = logging.getLogger(__name__)

#: Neutral prompts for the KL measurement: everyday text with no particular topic, tone or language cue.
DEFAULT_NEUTRAL_PROMPTS: tuple[str, ...] = (
    "The weather today is",
    "Here is a list of things to pack for a trip:",
    "The history of the printing press",
    "To make a cup of tea, first",
    "My neighbour has a small garden where",
    "The train station was busy this morning because",
    "A good way to learn a new skill is",
    "The museum opened a new exhibition about",
    "In the evening we usually",
    "The report describes how the company",
    "Water boils at a temperature of",
    "The best thing about living in a small town is",
)


# ------------------------------------------------------------------------------------------ inputs


def _prompt_label(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1]["content"])


def _check_completions(completions: Any, name: str) -> list[str]:
    if completions is None:
        return []
    if isinstance(completions, str):
        raise TypeError(f"`{name}` must be a list of strings, got a single str; wrap it in a list")
    out = list(completions)
    for i, c in enumerate(out):
        if not isinstance(c, str) or not c:
            raise ValueError(f"`{name}[{i}]` must be a non-empty string, got {c!r}")
    return out


def check_generation(max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any,
                     batch_size: Any) -> None:
    """Check the generation arguments of :func:`generate` / :func:`evaluate` (before any work): ``temperature``
    0 (greedy) or in ``[1e-4, inf)``, ``top_p`` in ``(0, 1]``, ``seed`` an int in ``[0, 2**63)``."""
    validate.integer("max_new_tokens", max_new_tokens, 1)
    validate.integer("batch_size", batch_size, 1)
    validate.integer("top_k", top_k, 0)
    if validate.seed("seed", seed) is None:
        raise TypeError("`seed` must be an int in [0, 2**63), got None")
    if validate.real("temperature", temperature) != 0 and temperature < 1e-4:
        raise ValueError(f"`temperature` must be 0 (greedy) or >= 1e-4, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}")


# ---------------------------------------------------------------------------------------- steering


def _check_steering(model: nn.Module, steering: Any) -> None:
    """Type-check ``steering`` and check every vector against ``model`` (hidden size, layer range)
    without running it."""
    vectors, hooks = _normalize_steering(steering)
    d = arch.hidden_size(model)
    for vec, _ in vectors:
        if vec.hidden_size != d:
            raise ValueError(f"`steering`: a vector has hidden size {vec.hidden_size}, the model has {d}")
        try:
            vec.check_values()
        except ValueError as e:
            raise ValueError(f"`steering`: {e}") from None
        for layer in vec.layers:
            arch.resolve_layer(model, layer, name="steering layer")
    for layer, _ in hooks:
        arch.resolve_layer(model, layer, name="steering layer")


def _strength(value: Any) -> float:
    """A checked steering strength: a finite number, as ``float`` (no callable)."""
    strength = check_multiplier(value, allow_callable=False)
    assert isinstance(strength, float)  # check_multiplier returns a float when callables are not allowed
    return strength


def _normalize_steering(steering: Any) -> tuple[list[tuple[SteeringVector, float]], list[tuple[int, Callable]]]:
    """Split ``steering`` into (SteeringVector, strength) pairs and raw (layer, hook) pairs."""
    vectors: list[tuple[SteeringVector, float]] = []
    hooks: list[tuple[int, Callable]] = []
    if steering is None:
        return vectors, hooks
    if isinstance(steering, SteeringVector):
        return [(steering, 1.0)], hooks
    if isinstance(steering, Mapping):
        if not steering or not all(isinstance(k, int) and isinstance(v, torch.Tensor) for k, v in steering.items()):
            raise TypeError("`steering` given as a dict must map int layers to (d,) tensors")
        return [(SteeringVector(dict(steering)), 1.0)], hooks
    items = [steering] if isinstance(steering, tuple) and len(steering) == 2 and \
        isinstance(steering[0], SteeringVector) else steering
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"`steering` must be None, a SteeringVector, (SteeringVector, strength), a {{layer: "
                        f"tensor}} dict, a list of those, or [(layer, hook), ...]; got {type(steering).__name__}")
    for i, item in enumerate(items):
        if isinstance(item, SteeringVector):
            vectors.append((item, 1.0))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], SteeringVector):
            vectors.append((item[0], _strength(item[1])))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int) and callable(item[1]):
            hooks.append((item[0], item[1]))
        else:
            raise TypeError(f"`steering[{i}]` must be a SteeringVector, (SteeringVector, strength) or "
                            f"(layer, hook); got {item!r}"[:300])
    return vectors, hooks


@contextlib.contextmanager
def steering_context(model: nn.Module, steering: Any, multiplier: float = 1.0) -> Iterator[None]:
    """Apply ``steering`` (any form accepted by :func:`evaluate`) to ``model`` inside the block;
    every hook is removed on exit, also on errors. ``multiplier`` scales every SteeringVector;
    raw hooks cannot be scaled (``multiplier`` must then be 1)."""
    multiplier = _strength(multiplier)
    vectors, hooks = _normalize_steering(steering)
    if hooks and multiplier != 1.0:
        raise ValueError("`multiplier` cannot scale raw (layer, hook) steering; pass SteeringVectors instead")
    with contextlib.ExitStack() as stack:
        for vec, strength in vectors:
            stack.enter_context(vec.apply(model, multiplier=strength * multiplier))
        if hooks:
            stack.enter_context(attach(layer_hook_specs(model, hooks, name="steering")))
        yield


def _describe_steering(steering: Any) -> str:
    vectors, hooks = _normalize_steering(steering)
    if not vectors and not hooks:
        return "none"
    parts = [f"{v.kind}@{','.join(map(str, v.layers))}" + (f"x{s:g}" if s != 1 else "") for v, s in vectors]
    parts += [f"hook@{layer}" for layer, _ in hooks]
    return "+".join(parts)


# ------------------------------------------------------------------------------ public primitives


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    steering: Any = None,
    *,
    multiplier: float = 1.0,
    chat: bool = False,
    max_new_tokens: int = 40,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Batched (left-padded, KV-cached) generations after each prompt, under ``steering``.

    Greedy by default; ``do_sample=True`` samples with ``temperature`` (0: greedy, else >= 1e-4), ``top_p``,
    ``top_k`` (0: off), seeded with ``seed`` (an int in ``[0, 2**63)``; the same prompts, seed and ``batch_size``
    give the same texts; the global RNG is left untouched). Returns the decoded completions (special tokens
    skipped, cut at the first EOS, surrounding whitespace stripped). The model is left exactly as it was.
    """
    check_generation(max_new_tokens, temperature, top_p, top_k, seed, batch_size)
    prompts = check_prompts(prompts)
    _check_steering(model, steering)
    p_ids = encode_prompts(tokenizer, prompts, chat)
    with frozen_model(model), steering_context(model, steering, multiplier):
        ids = generate_ids(model, tokenizer, p_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size)
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]


def completion_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    steering: Any = None,
    *,
    multiplier: float = 1.0,
    chat: bool = False,
    per_token: bool = False,
    batch_size: int = 16,
) -> torch.Tensor:
    """Log-probability (nats) of every completion after every prompt, under ``steering``.

    Returns a float32 tensor ``(n_prompts, n_completions)`` of ``Σ_t log p(y_t)`` (``per_token=True``:
    the mean over the completion's tokens instead). Prompt and completion are tokenised separately
    (prompt with special tokens), as in training.
    """
    prompts = check_prompts(prompts)
    comps = _check_completions(completions, "completions")
    if not comps:
        raise ValueError("`completions` must be a non-empty list of strings")
    validate.integer("batch_size", batch_size, 1)
    _check_steering(model, steering)
    p_ids = encode_prompts(tokenizer, prompts, chat)
    c_ids = [encode(tokenizer, c, special=False) for c in comps]
    pairs = [(p, c) for p in p_ids for c in c_ids]
    with frozen_model(model), steering_context(model, steering, multiplier):
        lps = token_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    vals = torch.tensor([float(x.mean() if per_token else x.sum()) for x in lps])
    return vals.view(len(p_ids), len(c_ids))


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    *,
    chat: bool = False,
    batch_size: int = 16,
) -> list[float]:
    """Perplexity of ``completions[i]`` after ``prompts[i]`` under ``model`` as it is (no steering):
    ``exp(−(1/T) Σ_t log p(y_t))`` over the completion's T tokens. Use it on steered generations to
    measure how natural the unsteered model finds them. An empty completion gives ``nan``."""
    prompts = check_prompts(prompts)
    if isinstance(completions, str) or len(completions) != len(prompts):
        raise ValueError(f"`completions` must be a list with one string per prompt ({len(prompts)}), "
                         f"got {completions!r}"[:200])
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"`completions[{i}]` must be a str, got {type(c).__name__}")
    p_ids = encode_prompts(tokenizer, prompts, chat)
    pairs = [(p, encode(tokenizer, c, special=False) if c else []) for p, c in zip(p_ids, completions)]
    with frozen_model(model):
        lps = token_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    return [math.exp(-float(x.mean())) if x.numel() else math.nan for x in lps]


def kl_divergence(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    steering: Any,
    *,
    multiplier: float = 1.0,
    chat: bool = False,
    positions: str = "all",
    batch_size: int = 16,
) -> float:
    """Mean ``KL(p_unsteered ‖ p_steered)`` (nats) of the next-token distributions over every token
    position of ``prompts`` (``positions="last"``: only the last position of each prompt)."""
    prompts = check_prompts(prompts)
    if positions not in ("all", "last"):
        raise ValueError(f"`positions` must be 'all' or 'last', got {positions!r}")
    _check_steering(model, steering)
    p_ids = encode_prompts(tokenizer, prompts, chat)
    with frozen_model(model):
        base = next_token_logprobs(model, tokenizer, p_ids, positions=positions, batch_size=batch_size)
        with steering_context(model, steering, multiplier):
            steered = next_token_logprobs(model, tokenizer, p_ids, positions=positions, batch_size=batch_size)
    return mean_kl(base, steered)


# ------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        records: one dict per prompt (keys:
            ``prompt``, ``steered``, ``unsteered``, ``score``, ``success``, ``unsteered_success``,
            ``distinct2``, ``repetition``, ``real_words``, ``fluent``, ``fluent_success``,
            ``perplexity``, ``promote_logprob``, ``suppress_logprob``, ``margin``, ``margin_gain``, ...).
        summary: aggregates: ``n_prompts``, ``success_rate``, ``unsteered_success_rate``,
            ``fluent_rate``, ``fluent_success_rate``, ``distinct2``, ``repetition``, ``real_words``,
            ``perplexity`` (pooled), ``kl`` (nats), ``margin_gain`` (nats), ``promote_gain``,
            ``suppress_gain``, ``time_s``. Metrics that were not measured are ``None``.
        config: the settings (steering description, multiplier, scorer, lengths, ...).
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]

    def to_pandas(self) -> Any:
        """The records as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.records)

    def show(self, n: int | None = None, width: int = 100) -> str:
        """A readable side-by-side of unsteered and steered texts (first ``n`` prompts)."""
        lines = []
        for r in self.records[: n if n is not None else len(self.records)]:
            ok = "" if r.get("success") is None else (" ✓" if r["success"] else " ✗")
            lines.append(f"prompt: {r['prompt'][:width]!r}")
            if r.get("unsteered") is not None:
                lines.append(f"  unsteered: {r['unsteered'][:width]!r}")
            if r.get("steered") is not None:
                lines.append(f"  steered{ok}: {r['steered'][:width]!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        keys = ("n_prompts", "success_rate", "fluent_success_rate", "unsteered_success_rate", "kl", "perplexity",
                "margin_gain")
        parts = [f"{k}={self.summary[k]:.3g}" if isinstance(self.summary.get(k), float) else
                 f"{k}={self.summary.get(k)}" for k in keys if k in self.summary]
        return f"EvalResult({self.config.get('steering')}, " + ", ".join(parts) + ")"


def _mean(xs: Sequence[Any]) -> float | None:
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


class Evaluator:
    """Evaluates many steerings on the same prompts; the unsteered work is done once and cached.

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        prompts: held-out prompts (strings or chat conversations).
        scorer: success scorer (callable ``(completion, prompt) -> [0, 1]``) or a spec for
            :func:`steering_opt.scorers.get_scorer` (``"refusal"``, ``"language:es"``, ...); ``None``:
            no success metrics.
        promote / suppress: completions whose log-prob after each prompt is measured (``margin``).
        neutral_prompts: prompts for the KL measurement (default :data:`DEFAULT_NEUTRAL_PROMPTS`;
            ``[]``/``None`` skips KL). They get the same ``chat`` treatment as ``prompts``.
        chat: wrap plain-string prompts as one user turn of the chat template.
        generate: generate texts (``False``: log-prob and KL metrics only — much faster).
        max_new_tokens, do_sample, temperature, top_p, top_k, seed, batch_size: see :func:`generate`.
        fluency_lang: language of the real-word check; ``"auto"``: the scorer's ``lang`` attribute
            (``"en"`` if it has none); ``None``: skip the real-word check (distinct-2 only). Without
            the ``wordfreq`` package the check is skipped with a warning.
        min_distinct2, min_real_words: fluency thresholds.
        kl_positions: ``"all"`` or ``"last"`` token positions of the neutral prompts.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        *,
        scorer: Any = None,
        promote: Sequence[str] | None = None,
        suppress: Sequence[str] | None = None,
        neutral_prompts: Sequence[Prompt] | None = DEFAULT_NEUTRAL_PROMPTS,
        chat: bool = False,
        generate: bool = True,
        max_new_tokens: int = 40,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        batch_size: int = 16,
        fluency_lang: str | None = "auto",
        min_distinct2: float = 0.75,
        min_real_words: float = 0.95,
        kl_positions: str = "all",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if tokenizer is None:
            raise ValueError("`tokenizer` is required")
        check_generation(max_new_tokens, temperature, top_p, top_k, seed, batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.prompts = check_prompts(prompts)
        self.scorer = get_scorer(scorer) if scorer is not None else None
        self.promote = _check_completions(promote, "promote")
        self.suppress = _check_completions(suppress, "suppress")
        self.neutral = check_prompts(neutral_prompts, "neutral_prompts") if neutral_prompts else []
        self.chat = bool(chat)
        self.do_generate = bool(generate)
        for name, val in (("min_distinct2", min_distinct2), ("min_real_words", min_real_words)):
            if not isinstance(val, (int, float)) or not 0 <= val <= 1:
                raise ValueError(f"`{name}` must be in [0, 1], got {val!r}")
        if kl_positions not in ("all", "last"):
            raise ValueError(f"`kl_positions` must be 'all' or 'last', got {kl_positions!r}")
        self.gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                               temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                               batch_size=batch_size)
        self.batch_size = batch_size
        if fluency_lang == "auto":
            fluency_lang = getattr(self.scorer, "lang", None) or "en"
        if fluency_lang is not None:
            try:
                real_word_fraction("test", fluency_lang)
            except ImportError:
                log.warning("wordfreq is not installed: the real-word fluency check is skipped "
                            "(pip install 'steering-opt[eval]')")
                fluency_lang = None
        self.fluency_lang = fluency_lang
        self.min_distinct2, self.min_real_words = float(min_distinct2), float(min_real_words)
        self.kl_positions = kl_positions
        self.prompt_ids = encode_prompts(tokenizer, self.prompts, self.chat)
        self.neutral_ids = encode_prompts(tokenizer, self.neutral, self.chat) if self.neutral else []
        self.promote_ids = [encode(tokenizer, c, special=False) for c in self.promote]
        self.suppress_ids = [encode(tokenizer, c, special=False) for c in self.suppress]
        longest_c = max(map(len, self.promote_ids + self.suppress_ids), default=0)  # refuse before any forward
        arch.check_context_length(model, max(map(len, self.prompt_ids + self.neutral_ids)) + longest_c,
                                  "a prompt (+ completion)")
        self._base: dict[str, Any] | None = None
        self.reuse_lower_blocks = True  # scoring passes run only the blocks from the lowest steered one on
        self.share_prompts = True  # margins: both completions after one copy of each prompt (off: raw hooks)
        self._upper: dict[int, UpperBlocks | None] = {}

    # --------------------------------------------------------------------------- measurements
    def _upper_blocks(self, steering: Any) -> UpperBlocks | None:
        """Reuse of the unsteered lower blocks for ``steering`` (block-input steering from layer >= 1 only)."""
        vectors, hooks = _normalize_steering(steering)
        if not self.reuse_lower_blocks or not (vectors or hooks) or any(v.layer_type != "decoder_block"
                                                                         for v, _ in vectors):
            return None  # nothing steered, or a site whose lower blocks may differ
        return upper_blocks(self.model, min([x for v, _ in vectors for x in v.layers] + [x for x, _ in hooks]),
                            self._upper)

    def _share(self, steering: Any) -> bool:
        """Whether the margins pack each prompt's completions (not under raw hooks: they may select tokens by
        position from the end of the sequence)."""
        return self.share_prompts and not _normalize_steering(steering)[1]

    def _margins(self, forward: Forward | None = None, share: bool = False) -> tuple[
            list[float | None], list[float | None], list[float | None]]:
        comps = self.promote_ids + self.suppress_ids
        if not comps:
            n = len(self.prompt_ids)
            return [None] * n, [None] * n, [None] * n
        pairs = [(p, c) for p in self.prompt_ids for c in comps]
        lps = token_logprobs(self.model, self.tokenizer, pairs, batch_size=self.batch_size, forward=forward,
                             share_prompts=share)
        sums = torch.tensor([float(x.sum()) for x in lps]).view(len(self.prompt_ids), len(comps))
        n_p = len(self.promote_ids)
        prom = sums[:, :n_p].mean(1).tolist() if n_p else [None] * len(self.prompt_ids)
        supp = sums[:, n_p:].mean(1).tolist() if self.suppress_ids else [None] * len(self.prompt_ids)
        marg = [(a if a is not None else 0.0) - (b if b is not None else 0.0) for a, b in zip(prom, supp)]
        return prom, supp, marg

    def _texts(self) -> tuple[list[str], list[list[int]]]:
        ids = generate_ids(self.model, self.tokenizer, self.prompt_ids, **self.gen_kwargs)
        return [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids], ids

    def _quality(self, texts: list[str], ids: list[list[int]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"score": [], "success": [], "distinct2": [], "repetition": [],
                                     "real_words": [], "fluent": [], "fluent_success": []}
        for prompt, text in zip(self.prompts, texts):
            score = None if self.scorer is None else float(self.scorer(text, _prompt_label(prompt)))
            d2 = distinct_n(text, 2)
            rw = real_word_fraction(text, self.fluency_lang) if self.fluency_lang else None
            fluent = d2 >= self.min_distinct2 and (rw is None or rw >= self.min_real_words)
            success = None if score is None else score >= 0.5
            for k, v in zip(out, (score, success, d2, repetition_rate(text), rw, fluent,
                                  None if success is None else bool(success and fluent))):
                out[k].append(v)
        return out

    def _nll(self, ids: list[list[int]]) -> tuple[list[float], list[int]]:
        """Summed NLL (nats) and token count of each generation under the unsteered model."""
        pairs = [(p, c) for p, c in zip(self.prompt_ids, ids)]
        lps = token_logprobs(self.model, self.tokenizer, pairs, batch_size=self.batch_size)
        return [-float(x.sum()) for x in lps], [int(x.numel()) for x in lps]

    def baseline(self, layers: Sequence[int] = ()) -> dict[str, Any]:
        """The unsteered measurements (computed on first use, then cached). ``layers``: steered layers to be
        measured next: these passes also store the residual stream entering them (``reuse_lower_blocks``)."""
        if self._base is None:
            with frozen_model(self.model):
                ups = [u for x in sorted(set(layers)) if self.reuse_lower_blocks and
                       (u := upper_blocks(self.model, arch.resolve_layer(self.model, x), self._upper))]
                fwd = recording(self.model, ups) if ups else None
                base: dict[str, Any] = {}
                base["promote"], base["suppress"], base["margin"] = self._margins(fwd, self.share_prompts)
                if self.neutral_ids:
                    base["neutral"] = next_token_logprobs(self.model, self.tokenizer, self.neutral_ids, forward=fwd,
                                                           positions=self.kl_positions, batch_size=self.batch_size)
                if self.do_generate:
                    base["texts"], base["ids"] = self._texts()
                    base["quality"] = self._quality(base["texts"], base["ids"])
                    base["nll"], base["ntok"] = self._nll(base["ids"])
            self._base = base
        return self._base

    def planned_passes(self, steering: Any = None) -> int:
        """The forward passes of one :meth:`evaluate` of ``steering`` (twice as many while the baseline is not
        cached)."""
        bs, gen = self.batch_size, int(self.gen_kwargs["max_new_tokens"]) if self.do_generate else 0
        pairs = [(p, c) for p in self.prompt_ids for c in self.promote_ids + self.suppress_ids]
        one = len(logprob_batches(self.model, pairs, bs, share_prompts=self._share(steering))) + \
            planned_passes([len(p) for p in self.neutral_ids], bs)
        if gen:
            one += planned_passes([len(p) for p in self.prompt_ids], bs, generate=gen) + \
                len(logprob_batches(self.model, [(p, [0] * gen) for p in self.prompt_ids], bs))
        return one * (2 if self._base is None else 1)

    def evaluate(self, steering: Any, multiplier: float = 1.0, *, label: str | None = None,
                 progress: bool | None = None) -> EvalResult:
        """Measure ``steering`` (any form, see the module docstring) at strength ``multiplier``; ``progress``:
        one bar over the model's forward passes, see :func:`evaluate`."""
        multiplier = _strength(multiplier)
        _check_steering(self.model, steering)
        check_progress(progress)
        with overall(self.planned_passes(steering), "evaluate", progress=progress, unit="pass"):
            return self._measure(steering, multiplier, label)

    def _measure(self, steering: Any, multiplier: float, label: str | None) -> EvalResult:
        start = time.perf_counter()
        base = self.baseline()
        with frozen_model(self.model):
            upper = self._upper_blocks(steering)  # in eval mode: the view copies the train/eval flags when made
            with upper.feeding() if upper else contextlib.nullcontext(), \
                    steering_context(self.model, steering, multiplier):
                fwd = upper.forward if upper else None
                prom, supp, marg = self._margins(fwd, self._share(steering))
                neutral = (next_token_logprobs(self.model, self.tokenizer, self.neutral_ids, forward=fwd,
                                                positions=self.kl_positions, batch_size=self.batch_size)
                           if self.neutral_ids else None)
                texts, ids = self._texts() if self.do_generate else (None, [])
            kl = mean_kl(base["neutral"], neutral) if neutral is not None else None
            if texts is not None:
                quality = self._quality(texts, ids)
                nll, ntok = self._nll(ids)
        has_margin = bool(self.promote_ids or self.suppress_ids)
        records = []
        for i, prompt in enumerate(self.prompts):
            r: dict[str, Any] = {"prompt": _prompt_label(prompt), "steering": label or _describe_steering(steering),
                                 "multiplier": multiplier}
            if texts is not None:
                r.update(steered=texts[i], unsteered=base["texts"][i])
                for key in quality:
                    r[key] = quality[key][i]
                r["unsteered_score"] = base["quality"]["score"][i]
                r["unsteered_success"] = base["quality"]["success"][i]
                r["unsteered_distinct2"] = base["quality"]["distinct2"][i]
                r["perplexity"] = math.exp(nll[i] / ntok[i]) if ntok[i] else math.nan
                r["unsteered_perplexity"] = math.exp(base["nll"][i] / base["ntok"][i]) if base["ntok"][i] else math.nan
                r["n_tokens"] = ntok[i]
            if has_margin:
                r.update(promote_logprob=prom[i], suppress_logprob=supp[i], margin=marg[i],
                         unsteered_margin=base["margin"][i], margin_gain=marg[i] - base["margin"][i])
            records.append(r)
        summary: dict[str, Any] = {"n_prompts": len(records)}
        if texts is not None:
            for key in ("success", "unsteered_success", "fluent", "fluent_success"):
                summary[f"{key}_rate"] = _mean([r[key] for r in records])
            summary["unsteered_fluent_success_rate"] = _mean(base["quality"]["fluent_success"])
            summary.update({k: _mean([r[k] for r in records]) for k in ("distinct2", "repetition", "real_words")})
            total = sum(ntok)
            summary["perplexity"] = math.exp(sum(nll) / total) if total else math.nan
            bt = sum(base["ntok"])
            summary["unsteered_perplexity"] = math.exp(sum(base["nll"]) / bt) if bt else math.nan
        summary["kl"] = kl
        if has_margin:
            summary["margin_gain"] = _mean([r["margin_gain"] for r in records])
            if self.promote_ids:
                summary["promote_gain"] = _mean([a - b for a, b in zip(prom, base["promote"])])
            if self.suppress_ids:
                summary["suppress_gain"] = _mean([a - b for a, b in zip(supp, base["suppress"])])
        summary["time_s"] = time.perf_counter() - start
        config = {"steering": label or _describe_steering(steering), "multiplier": multiplier,
                  "scorer": getattr(self.scorer, "name", None) or (repr(self.scorer) if self.scorer else None),
                  "chat": self.chat, "fluency_lang": self.fluency_lang, "min_distinct2": self.min_distinct2,
                  "min_real_words": self.min_real_words, "n_neutral_prompts": len(self.neutral),
                  "kl_positions": self.kl_positions, **({k: v for k, v in self.gen_kwargs.items()}
                                                        if self.do_generate else {})}
        return EvalResult(records=records, summary=summary, config=config)


def evaluate(
    model: nn.Module, tokenizer: Any, steering: Any, prompts: Sequence[Prompt], *, multiplier: float = 1.0,
    scorer: Any = None, promote: Sequence[str] | None = None, suppress: Sequence[str] | None = None,
    neutral_prompts: Sequence[Prompt] | None = DEFAULT_NEUTRAL_PROMPTS, chat: bool = False, generate: bool = True,
    max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
    seed: int = 0, batch_size: int = 16, fluency_lang: str | None = "auto", min_distinct2: float = 0.75,
    min_real_words: float = 0.95, kl_positions: str = "all", progress: bool | None = None,
) -> EvalResult:
    """Evaluate ``steering`` on held-out ``prompts``: steered vs unsteered generations, success,
    fluency, perplexity, completion log-prob shifts and KL on neutral prompts.

    See :class:`Evaluator` for the arguments and the module docstring for the metrics (units: nats).
    ``progress``: one bar over the model's forward passes (each generated token counts as one), with an ETA:
    ``None`` (default) when a person is watching (Jupyter, or stderr a terminal; ``STEERING_OPT_PROGRESS=0/1``
    overrides), ``True`` / ``False`` always / never.
    The model is left exactly as it was (hooks removed, ``requires_grad`` flags and train/eval mode
    restored), also when an error is raised.

    Returns:
        An :class:`EvalResult` (``.records``: one dict per prompt; ``.summary``; ``.to_pandas()``).
    """
    ev = Evaluator(model, tokenizer, prompts, scorer=scorer, promote=promote, suppress=suppress,
                   neutral_prompts=neutral_prompts, chat=chat, generate=generate, max_new_tokens=max_new_tokens,
                   do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   batch_size=batch_size, fluency_lang=fluency_lang, min_distinct2=min_distinct2,
                   min_real_words=min_real_words, kl_positions=kl_positions)
    return ev.evaluate(steering, multiplier, progress=progress)
__import__("steering_opt.util").util.make_module_callable(__name__)  # calling the module calls evaluate()
