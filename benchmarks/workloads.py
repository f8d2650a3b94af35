"""Shared benchmark workloads (the seed tutorial's datapoint and variations of it) and ``saved_bytes``."""

from __future__ import annotations

from typing import Any

import torch

from steering_opt import TrainingDatapoint

TUTORIAL_PROMPT = (
    "Some of my fondest childhood memories are from my summer vacations back when I was little. Every now and "
    "then, after a long day of playing outside, I would come back home to be greeted with the delicious smell of "
    "my grandma's hazelnut cake wafting out of the kitchen. In this recipe, I'll teach you how to make that very "
    "cake, and create your own summer memories.\n\n"
)
EN = "<h2>Ingredients</h2>\n\n* 1 cup of all-purpose flour"
ES = "<h2>Ingredientes</h2>\n\n* 1 taza de harina común"

EN_MORE = [EN, "Ingredients:\n\n- 2 cups of sugar", "First, preheat the oven to 350 degrees.",
           "You will need butter, eggs and hazelnuts."]
ES_MORE = [ES, "Ingredientes:\n\n- 2 tazas de azúcar", "Primero, precalienta el horno a 180 grados.",
           "Necesitarás mantequilla, huevos y avellanas."]

PROMPTS = [
    "My favorite sports are",
    "Here is a short story about a dragon who wanted to learn to cook.\n\n",
    "The weather today is",
    "In this article, we will explain how solar panels turn sunlight into electricity, and why they "
    "are becoming cheaper every year.\n\n",
    "Dear diary, today I",
    "The best way to learn a new programming language is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.",
    "Three tips for staying focused while studying:\n\n",
]


def tutorial() -> list[TrainingDatapoint]:
    """(a) the tutorial's single datapoint: one src and one dst completion."""
    return [TrainingDatapoint(TUTORIAL_PROMPT, src_completions=[EN], dst_completions=[ES])]


def many_completions() -> list[TrainingDatapoint]:
    """(b) one prompt with 8 completions (4 src, 4 dst)."""
    return [TrainingDatapoint(TUTORIAL_PROMPT, src_completions=EN_MORE, dst_completions=ES_MORE)]


def many_datapoints() -> list[TrainingDatapoint]:
    """(c) 8 datapoints × 2 completions, prompts of different lengths."""
    return [TrainingDatapoint(p, src_completions=[" " + EN_MORE[i % 4]], dst_completions=[" " + ES_MORE[i % 4]])
            for i, p in enumerate(PROMPTS)]


def saved_bytes(fn: Any, model: torch.nn.Module) -> int:
    """Bytes of the activations autograd saves for backward while ``fn`` runs (the model's weights excluded):
    the memory a training step holds at its peak beyond the model. Used by ``bench_optimize.py`` and by the
    engine's memory test."""
    weights = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]
