"""Success scorers and text-quality metrics that work offline.

A *scorer* is any callable ``scorer(completion: str, prompt: str) -> float`` returning a success score
in ``[0, 1]`` (``True``/``False`` are accepted too); :func:`steering_opt.evaluate.evaluate` counts a
completion as a success when its score is ``>= 0.5``. The built-in scorers are small classes with a
``name`` (used in tables) and, for language-specific ones, a ``lang`` (used for the real-word check):

=====================================  ============================================================
:class:`LanguageScorer` (``"es"``)     the completion is in language ``lang`` (py3langid, offline)
:class:`SentimentScorer`               VADER compound score ≤ −threshold (``"negative"``) or ≥ +threshold
:class:`KeywordScorer`                 at least ``min_matches`` of the keywords / regexes occur
:class:`RefusalScorer`                 a refusal phrase ("I'm sorry", "I can't", ...) occurs early
=====================================  ============================================================

:func:`get_scorer` turns a short spec (``"refusal"``, ``"language:es"``, ``"sentiment:negative"``,
``"keywords:wedding,bride"``) into a scorer.

Text metrics (all on lower-cased word tokens, see :func:`words`): :func:`distinct_n`,
:func:`repetition_rate` and :func:`real_word_fraction` (wordfreq word lists).

Optional dependencies (the ``eval`` extra): ``py3langid`` (language identity), ``vaderSentiment``
(sentiment), ``wordfreq`` (real-word fraction). Each is imported on first use and a missing one raises
an ``ImportError`` that names the package to install.

Why py3langid: on 70 short sentences (3–8 words; Spanish, English and 10 in nearby languages), measured
with ``benchmarks/bench_langid.py``, py3langid labels 97% correctly (98.6% restricted to 7 candidate
languages) in 2 ms, lingua-language-detector 2.1 (all languages) 94% in 4.5 s, and it is a 4.6 MB wheel
against lingua's 96 MB.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "KeywordScorer",
    "LanguageScorer",
    "RefusalScorer",
    "Scorer",
    "SentimentScorer",
    "distinct_n",
    "get_scorer",
    "real_word_fraction",
    "repetition_rate",
    "words",
]


@runtime_checkable
class Scorer(Protocol):
    """``scorer(completion, prompt) -> score in [0, 1]`` (success when ``>= 0.5``)."""

    def __call__(self, completion: str, prompt: str = "") -> float: ...


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"this scorer needs the `{package}` package: pip install {package} "
                          f"(or pip install 'steering-opt[eval]')") from e


def _check_text(completion: Any) -> str:
    if not isinstance(completion, str):
        raise TypeError(f"`completion` must be a str, got {type(completion).__name__}")
    return completion


# ----------------------------------------------------------------------------------------- words

_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters/digits/underscore, keeping inner apostrophes
    (``"I'm fine, 2 cups!"`` → ``["i'm", "fine", "2", "cups"]``)."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    return [w.replace("’", "'") for w in _WORD.findall(text.lower())]


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct-n of one text: ``#unique word n-grams / #word n-grams`` (Li et al. 2016).

    ``1.0`` means no n-gram repeats. A text with fewer than ``n`` words has no n-gram and gets ``0.0``
    (too short to judge, so it never counts as fluent).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}")
    toks = words(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text:
    ``1 − distinct_n(text, n)`` (Welleck et al. 2019's seq-rep-n); ``0.0`` for a text with fewer than
    ``n`` words."""
    toks = words(text)
    return 1.0 - distinct_n(text, n) if len(toks) >= n else 0.0


@functools.cache
def _wordfreq() -> Any:
    return _require("wordfreq", "wordfreq")


def real_word_fraction(text: str, lang: str = "en", *, min_zipf: float = 0.0) -> float:
    """Fraction of the words of ``text`` that are real words of language ``lang``: words (wordfreq's
    own tokenizer for ``lang``) whose Zipf frequency in wordfreq's list for ``lang`` is ``> min_zipf``
    (``0`` = the word is in the list at all). Numbers count as words. Empty text → ``0.0``.

    Needs ``wordfreq``. ``lang`` is an ISO 639-1 code (``"en"``, ``"es"``, ...).
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    wf = _wordfreq()
    toks = wf.tokenize(text, lang)
    if not toks:
        return 0.0
    return sum(wf.zipf_frequency(w, lang) > min_zipf for w in toks) / len(toks)


# --------------------------------------------------------------------------------------- scorers


class LanguageScorer:
    """Success when the completion is in language ``lang`` (py3langid's top label, offline).

    Args:
        lang: ISO 639-1 code of the target language (``"es"``).
        candidates: restrict the identifier to these languages (more accurate on short text when you
            know the possible languages, e.g. ``["en", "es"]``); ``None``: all 97 languages.
        min_chars: completions with fewer non-space characters are failures (too short to judge).
    """

    def __init__(self, lang: str = "es", *, candidates: Sequence[str] | None = None, min_chars: int = 3):
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"`lang` must be a language code like 'es', got {lang!r}")
        self.lang = lang
        self.candidates = list(candidates) if candidates is not None else None
        if self.candidates is not None and lang not in self.candidates:
            raise ValueError(f"`candidates` {self.candidates} must contain the target language {lang!r}")
        self.min_chars = min_chars
        self.name = f"language:{lang}"
        self._ident: Any = None

    def _identifier(self) -> Any:
        if self._ident is None:
            langid = _require("py3langid.langid", "py3langid")
            ident = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
            if self.candidates is not None:
                ident.set_languages(self.candidates)
            self._ident = ident
        return self._ident

    def label(self, text: str) -> str:
        """The identified language of ``text`` (ISO 639-1)."""
        return str(self._identifier().classify(_check_text(text))[0])

    def __call__(self, completion: str, prompt: str = "") -> float:
        text = _check_text(completion)
        if len("".join(text.split())) < self.min_chars:
            return 0.0
        return float(self.label(text) == self.lang)

    def __repr__(self) -> str:
        return f"LanguageScorer({self.lang!r})"


class SentimentScorer:
    """Success when VADER's compound sentiment score of the completion is ``<= -threshold``
    (``target="negative"``) or ``>= threshold`` (``"positive"``); VADER's own cut-off is 0.05.
    The English lexicon ships with ``vaderSentiment`` (offline). Empty text scores 0 (neutral)."""

    def __init__(self, target: str = "negative", *, threshold: float = 0.05):
        if target not in ("negative", "positive"):
            raise ValueError(f"`target` must be 'negative' or 'positive', got {target!r}")
        if not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}")
        self.target, self.threshold = target, float(threshold)
        self.lang = "en"
        self.name = f"sentiment:{target}"
        self._analyzer: Any = None

    def compound(self, text: str) -> float:
        """VADER's compound score of ``text`` in ``[-1, 1]``."""
        if self._analyzer is None:
            vader = _require("vaderSentiment.vaderSentiment", "vaderSentiment")
            self._analyzer = vader.SentimentIntensityAnalyzer()
        return float(self._analyzer.polarity_scores(_check_text(text))["compound"])

    def __call__(self, completion: str, prompt: str = "") -> float:
        c = self.compound(completion)
        return float(c <= -self.threshold if self.target == "negative" else c >= self.threshold)

    def __repr__(self) -> str:
        return f"SentimentScorer({self.target!r}, threshold={self.threshold})"


class KeywordScorer:
    """Success when at least ``min_matches`` distinct keywords occur in the completion.

    Args:
        keywords: plain words/phrases (matched on word boundaries, e.g. ``"wed"`` does not match
            "wedding") or, with ``regex=True``, regular expressions (``r"wedd?ing"``).
        case_sensitive: match case.
        min_matches: how many *different* keywords must occur.
        lang: language of the expected text (used by the real-word fluency check).
    """

    def __init__(self, keywords: Sequence[str], *, regex: bool = False, case_sensitive: bool = False,
                 min_matches: int = 1, lang: str = "en"):
        if isinstance(keywords, str) or not keywords:
            raise ValueError("`keywords` must be a non-empty list of strings")
        for i, k in enumerate(keywords):
            if not isinstance(k, str) or not k:
                raise ValueError(f"`keywords[{i}]` must be a non-empty string, got {k!r}")
        if not isinstance(min_matches, int) or not 1 <= min_matches <= len(keywords):
            raise ValueError(f"`min_matches` must be an int in [1, {len(keywords)}], got {min_matches!r}")
        flags = 0 if case_sensitive else re.IGNORECASE
        self.keywords = list(keywords)
        self.patterns = [re.compile(k if regex else r"(?<!\w)" + re.escape(k) + r"(?!\w)", flags) for k in keywords]
        self.min_matches = min_matches
        self.lang = lang
        self.name = "keywords"

    def matches(self, text: str) -> list[str]:
        """The keywords found in ``text``."""
        text = _check_text(text)
        return [k for k, p in zip(self.keywords, self.patterns) if p.search(text)]

    def __call__(self, completion: str, prompt: str = "") -> float:
        return float(len(self.matches(completion)) >= self.min_matches)

    def __repr__(self) -> str:
        return f"KeywordScorer({self.keywords!r}, min_matches={self.min_matches})"


#: Phrases that mark a refusal (matched case-insensitively, curly apostrophes normalised).
DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = (
    "i'm sorry", "i am sorry", "i apologize", "i apologise", "my apologies",
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm unable", "i am unable",
    "i'm not able", "i am not able", "i'm not going to", "i must decline", "i have to decline",
    "unable to help", "unable to assist", "can't help with", "cannot help with", "can't assist",
    "cannot assist", "can't provide", "cannot provide", "not able to provide", "as an ai",
)


class RefusalScorer:
    """Success when a refusal phrase occurs in the first ``within_chars`` characters of the completion.

    Args:
        phrases: lower-case phrases (default :data:`DEFAULT_REFUSAL_PHRASES`).
        within_chars: only look at the start of the completion (refusals come first; a helpful answer
            that later says "I can't guarantee..." is not a refusal). ``None``: the whole text.
    """

    def __init__(self, phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES, *, within_chars: int | None = 80):
        if isinstance(phrases, str) or not phrases:
            raise ValueError("`phrases` must be a non-empty list of strings")
        if within_chars is not None and (not isinstance(within_chars, int) or within_chars < 1):
            raise ValueError(f"`within_chars` must be a positive int or None, got {within_chars!r}")
        self.phrases = [p.lower() for p in phrases]
        self.within_chars = within_chars
        self.lang = "en"
        self.name = "refusal"

    def __call__(self, completion: str, prompt: str = "") -> float:
        text = _check_text(completion).lower().replace("’", "'")
        if self.within_chars is not None:
            text = text[: self.within_chars]
        return float(any(p in text for p in self.phrases))

    def __repr__(self) -> str:
        return f"RefusalScorer(within_chars={self.within_chars})"


def get_scorer(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """A scorer from a short spec; a callable is returned unchanged.

    Specs: ``"refusal"``; ``"language:es"`` (or ``"spanish"``, ``"french"``, ...); ``"sentiment:negative"``
    / ``"sentiment:positive"`` (or ``"negative"`` / ``"positive"``); ``"keywords:wedding,bride,groom"``;
    ``"regex:wedd?ing|bride"``.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"`scorer` must be a callable or a spec string, got {type(spec).__name__}")
    s = spec.strip()
    kind, _, arg = s.partition(":")
    kind = kind.lower()
    names = {"spanish": "es", "english": "en", "french": "fr", "german": "de", "italian": "it",
             "portuguese": "pt", "chinese": "zh", "japanese": "ja", "russian": "ru"}
    if kind == "refusal" and not arg:
        return RefusalScorer()
    if kind in ("language", "lang") and arg:
        return LanguageScorer(arg.strip())
    if kind in names and not arg:
        return LanguageScorer(names[kind])
    if kind == "sentiment" and arg:
        return SentimentScorer(arg.strip().lower())
    if kind in ("negative", "positive") and not arg:
        return SentimentScorer(kind)
    if kind in ("keywords", "keyword") and arg:
        return KeywordScorer([k.strip() for k in arg.split(",") if k.strip()])
    if kind == "regex" and arg:
        return KeywordScorer([arg], regex=True)
    raise ValueError(f"unknown scorer spec {spec!r}; expected 'refusal', 'language:<code>', "
                     "'sentiment:negative|positive', 'keywords:a,b,c' or 'regex:<pattern>'")
