"""Training datapoints and their tokenisation (done once, up front).

A :class:`TrainingDatapoint` is one prompt with completions to promote (``dst_completions``) and
completions to suppress (``src_completions``). :func:`tokenize_datapoints` turns a list of them into
flat :class:`TokenizedCompletion` records, one per (datapoint, completion), which both engines consume.

Prompt and completion are tokenised *separately* (the prompt with the tokenizer's special tokens,
the completion without), so the completion's tokens are exactly the completion's own tokens even
when the last characters of the prompt and the first characters of the completion would merge into
one token if tokenised together.

Texts too long for the model are refused *before* tokenising (:func:`check_chars_fit`): a token covers at most
as many characters as the longest entry of the tokenizer's vocabulary (81 for SmolLM2), so a text of more than
``2 * context_length * that`` characters cannot fit (the factor 2 is a margin for normalisers). This assumes the
tokenizer does not delete input characters: true for byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2), where a
vocabulary entry spells each byte as one character, and for the SentencePiece tokenizers of Llama 2, Mistral
and Gemma, which keep every space; a tokenizer that collapses runs of whitespace could in principle fit more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SRC, DST = 0, 1


@dataclasses.dataclass
class TrainingDatapoint:
    """One prompt and the completions whose probability steering should lower / raise.

    Attributes:
        prompt: the prompt text (tokenised with the tokenizer's special tokens, e.g. BOS).
        src_completions: completions to suppress (loss ``-Σ_t log(1 - p_t)``, nats).
        dst_completions: completions to promote (loss ``-Σ_t log p_t``, nats).
        src_completions_target_losses / dst_completions_target_losses: optional per-completion
            target losses (nats) used by early stopping with ``do_target_loss_sum=False`` and by the
            output-constrained phase; default: the global ``target_loss``.
        token: which token positions to steer on this datapoint: ``None`` (all), an int, a slice or
            a list of ints. Indices refer to positions in the tokenised prompt (+ completion);
            negative indices count back from the end of the *prompt*, so the same tokens are steered
            when the hook is later used to generate from this prompt.
        is_negative: steer this datapoint with ``-v`` instead of ``v``.
    """

    prompt: str
    src_completions: list[str] = dataclasses.field(default_factory=list)
    dst_completions: list[str] = dataclasses.field(default_factory=list)
    src_completions_target_losses: list[float] | None = None
    dst_completions_target_losses: list[float] | None = None
    token: int | slice | list[int] | None = None
    is_negative: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"TrainingDatapoint: `prompt` must be a str, got {type(self.prompt).__name__}")
        if self.prompt == "":
            raise ValueError("TrainingDatapoint: `prompt` is empty; expected a non-empty string")
        for name in ("src_completions", "dst_completions"):
            value = getattr(self, name)
            if value is None:
                value = []
            if isinstance(value, str):
                raise TypeError(f"TrainingDatapoint: `{name}` must be a list of strings, got a single str "
                                f"({value[:30]!r}); wrap it in a list")
            if isinstance(value, (bytes, dict)) or not isinstance(value, Iterable):
                raise TypeError(f"TrainingDatapoint: `{name}` must be a list of strings, got {type(value).__name__}")
            value = list(value)
            for i, c in enumerate(value):
                if not isinstance(c, str):
                    raise TypeError(f"TrainingDatapoint: `{name}[{i}]` must be a str, got {type(c).__name__}")
                if c == "":
                    raise ValueError(f"TrainingDatapoint: `{name}[{i}]` is an empty string")
            setattr(self, name, value)
        if not self.src_completions and not self.dst_completions:
            raise ValueError("TrainingDatapoint: no completions; give at least one of `src_completions` "
                             "or `dst_completions`")
        for name, comps in (("src_completions_target_losses", self.src_completions),
                            ("dst_completions_target_losses", self.dst_completions)):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
                    raise TypeError(f"TrainingDatapoint: `{name}` must be a list of numbers (nats), one per "
                                    f"completion, got {type(value).__name__} {value!r:.40}")
                value = list(value)
                for i, x in enumerate(value):
                    if isinstance(x, bool) or not isinstance(x, numbers.Real):
                        raise TypeError(f"TrainingDatapoint: `{name}[{i}]` must be a number (nats), got {x!r:.40}")
                    try:
                        if math.isnan(float(x)):
                            raise OverflowError
                    except OverflowError:
                        raise ValueError(f"TrainingDatapoint: `{name}[{i}]` must be a number (nats) that is not "
                                         f"NaN and fits a float, got {x!r:.40}") from None
                value = [float(x) for x in value]
                if len(value) != len(comps):
                    raise ValueError(f"TrainingDatapoint: `{name}` has {len(value)} entries but there are "
                                     f"{len(comps)} completions")
                setattr(self, name, value)
        if not isinstance(self.is_negative, (bool, numbers.Integral)) or self.is_negative not in (0, 1):
            raise TypeError(f"TrainingDatapoint: `is_negative` must be a bool, got {self.is_negative!r:.40}")
        self.is_negative = bool(self.is_negative)
        tok = self.token
        if tok is not None and not isinstance(tok, slice):
            if isinstance(tok, bool) or not (isinstance(tok, int) or
                                             (isinstance(tok, (list, tuple)) and
                                              all(isinstance(t, int) and not isinstance(t, bool) for t in tok))):
                raise TypeError(f"TrainingDatapoint: `token` must be None, an int, a slice or a list of ints, "
                                f"got {tok!r}")


@dataclasses.dataclass
class TokenizedCompletion:
    """One (datapoint, completion) pair, tokenised."""

    datapoint: int
    kind: int  # SRC or DST
    index: int  # completion index within its kind
    ids: list[int]  # prompt + completion token ids
    prompt_len: int
    steer_positions: list[bool] | None  # None: steer every position
    sign: float  # -1 for is_negative datapoints
    target: float | None  # per-completion target loss (nats), None if none given

    @property
    def completion_len(self) -> int:
        return len(self.ids) - self.prompt_len


_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters of input text one token of ``tokenizer`` can cover: the length of its longest
    vocabulary entry (computed once per tokenizer, ~60 ms for 49k entries), or None without ``get_vocab``."""
    try:
        return _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        vocab = tokenizer.get_vocab()
        longest: int | None = max((len(k) for k in vocab if isinstance(k, str)), default=0) or None
    except Exception:  # not a HF tokenizer (a TransformerLens model's, a stub): no bound
        longest = None
    try:
        _TOKEN_CHARS[tokenizer] = longest
    except TypeError:
        pass
    return longest


def check_chars_fit(tokenizer: Any, n_chars: int, max_length: int | None, what: str) -> None:
    """Refuse, without tokenising, a text of ``n_chars`` characters that needs more than ``max_length`` tokens
    whatever it says: more than ``2 * max_length * max_token_chars(tokenizer)`` characters (module docstring).

    Raises:
        ValueError: naming ``what``, its length and the model's context.
    """
    if max_length is None:
        return
    per_token = max_token_chars(tokenizer)
    if per_token is not None and n_chars > 2 * max_length * per_token:
        raise ValueError(f"{what} is {n_chars:,} characters long: more than the model's context of {max_length} "
                         f"tokens can hold (a token of this tokenizer covers at most {per_token} characters); "
                         "not tokenised")


def encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    """The token ids of ``text``; ``special``: with the tokenizer's special tokens (e.g. BOS), as for prompts
    (completions are encoded without)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def steer_positions(token: Any, prompt_len: int, total_len: int, only_hook_prompt: bool) -> list[bool] | None:
    """Per-position steering flags for one sequence (``None`` = every position): the positions
    :class:`~steering_opt.hooks.TokenSelection` selects for ``token`` (the one token-selection rule; negative
    values count back from the end of the prompt), restricted to the prompt with ``only_hook_prompt``.
    """
    if token is None and not only_hook_prompt:
        return None
    from .hooks import TokenSelection  # hooks needs torch; keep `import steering_opt.data` light

    flags = [True] * total_len
    if token is not None:
        for t in [token] if isinstance(token, int) else token if isinstance(token, (list, tuple)) else []:
            i = prompt_len + t if t < 0 else t
            if not 0 <= i < total_len:
                raise ValueError(f"TrainingDatapoint.token index {t} is outside the sequence "
                                 f"(prompt has {prompt_len} tokens, sequence {total_len})")
        import torch

        mask = TokenSelection(token_indices=token, name="TrainingDatapoint.token").mask(
            torch.arange(total_len)[None], torch.zeros(1, dtype=torch.long), torch.tensor([prompt_len]))
        assert mask is not None
        flags = [bool(x) for x in mask[0].tolist()]
    if only_hook_prompt:
        flags = [f and i < prompt_len for i, f in enumerate(flags)]
    return flags


def tokenize_datapoints(
    tokenizer: Any,
    datapoints: Sequence[TrainingDatapoint],
    *,
    only_hook_prompt: bool = False,
    target_loss: float | None = None,
    max_length: int | None = None,
) -> list[TokenizedCompletion]:
    """Tokenise every (datapoint, completion) once; the order is datapoint, then src, then dst."""
    seqs: list[TokenizedCompletion] = []
    for d, dp in enumerate(datapoints):  # lengths first: a text that cannot fit is refused before any tokenising
        longest = max((len(c) for c in (*dp.src_completions, *dp.dst_completions)), default=0)
        check_chars_fit(tokenizer, len(dp.prompt) + longest, max_length, f"datapoints[{d}]: prompt + completion")
    for d, dp in enumerate(datapoints):
        p_ids = encode(tokenizer, dp.prompt, special=True)
        if not p_ids:
            raise ValueError(f"datapoints[{d}].prompt tokenises to zero tokens")
        for kind, comps, targets in ((SRC, dp.src_completions, dp.src_completions_target_losses),
                                     (DST, dp.dst_completions, dp.dst_completions_target_losses)):
            for k, comp in enumerate(comps):
                c_ids = encode(tokenizer, comp, special=False)
                if not c_ids:
                    raise ValueError(f"datapoints[{d}] completion {comp!r} tokenises to zero tokens")
                ids = p_ids + c_ids
                if max_length is not None and len(ids) > max_length:
                    raise ValueError(f"datapoints[{d}]: prompt + completion is {len(ids)} tokens, longer than "
                                     f"the model's context ({max_length} tokens)")
                seqs.append(TokenizedCompletion(
                    datapoint=d, kind=kind, index=k, ids=ids, prompt_len=len(p_ids),
                    steer_positions=steer_positions(dp.token, len(p_ids), len(ids), only_hook_prompt),
                    sign=-1.0 if dp.is_negative else 1.0,
                    target=targets[k] if targets is not None else target_loss,
                ))
    return seqs


def nest_losses(seqs: Sequence[TokenizedCompletion], losses: Sequence[float],
                n_datapoints: int) -> list[list[list[float]]]:
    """Arrange per-sequence losses as ``out[i][j][k]``: datapoint i, j=0 src / j=1 dst, completion k."""
    out: list[list[list[float]]] = [[[], []] for _ in range(n_datapoints)]
    for s, loss in zip(seqs, losses):
        out[s.datapoint][s.kind].append(float(loss))
    return out


# ------------------------------------------------------------------------------------------- provenance


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types (dataclasses as dicts, tuples as lists, anything else as its repr)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def datapoints_sha256(datapoints: Sequence[Any]) -> str:
    """A sha256 (hex) of the datapoints' contents (every field of ``TrainingDatapoint``, or the contrast pairs),
    so two saves can be checked for having been made from the same data without storing it."""
    text = json.dumps(_plain(list(datapoints)), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_datapoints(datapoints: Sequence[Any], max_prompts: int = 3, max_chars: int = 200) -> dict[str, Any]:
    """A short JSON-able summary of training datapoints (``TrainingDatapoint`` or contrast pairs).

    ``{"count", "sha256" (:func:`datapoints_sha256`), "src_completions", "dst_completions",
    "examples": [first prompts, truncated]}``.
    """
    src = sum(len(getattr(d, "src_completions", []) or []) for d in datapoints)
    dst = sum(len(getattr(d, "dst_completions", []) or []) for d in datapoints)
    examples = []
    for d in list(datapoints)[:max_prompts]:
        text = getattr(d, "prompt", None)
        if text is None:
            text = getattr(d, "positive", None)
        if text is None and isinstance(d, (tuple, list)) and d:
            text = d[0]
        if isinstance(text, str):
            examples.append(text if len(text) <= max_chars else text[: max_chars - 1] + "…")
    out: dict[str, Any] = {"count": len(datapoints), "sha256": datapoints_sha256(datapoints), "examples": examples}
    if src or dst:
        out.update(src_completions=src, dst_completions=dst)
    return out
