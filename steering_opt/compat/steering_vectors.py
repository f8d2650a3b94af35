"""steering-vectors (Chanin et al.) API names, as thin adapters over the native contrastive core.

``train_steering_vector`` is :func:`steering_opt.contrastive.contrastive_vector` under steering-vectors'
name; the aggregators, operators, :func:`~steering_opt.contrastive.extract_activations` and
:func:`~steering_opt.contrastive.aggregate_activations` already carry steering-vectors' names and are
re-exported here, with :class:`~steering_opt.vector.SteeringVector` (``apply`` / ``patch`` as there),
so ``from steering_opt.compat.steering_vectors import ...`` replaces ``from steering_vectors import ...``.

Differences from steering-vectors, kept on purpose:

* layer numbering: steering-vectors reads a ``decoder_block`` at the block's *output*, so its layer ``L``
  is our layer ``L + 1``; here (as everywhere in steering_opt) layer ``L`` is the residual stream
  *entering* block ``L``, where the optimiser steers. Layers are never shifted silently.
* ``train_steering_vector``'s positional order after ``layer_config`` is ours (``read_token_index,
  batch_size, show_progress, aggregator``); steering-vectors' ``move_to_cpu`` / ``tqdm_desc`` do not
  exist (activations are always returned on the CPU). Pass those arguments by keyword.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..contrastive import (
    Aggregator,
    ContrastPair,
    ReadIndex,
    Text,
    ablation_operator,
    ablation_then_addition_operator,
    addition_operator,
    aggregate_activations,
    contrastive_vector,
    extract_activations,
    logistic_aggregator,
    mean_aggregator,
    pca_aggregator,
)
from ..vector import SiteConfig, SteeringVector

__all__ = [
    "SteeringVector",
    "ablation_operator",
    "ablation_then_addition_operator",
    "addition_operator",
    "aggregate_activations",
    "extract_activations",
    "logistic_aggregator",
    "mean_aggregator",
    "pca_aggregator",
    "train_steering_vector",
]


def train_steering_vector(
    model: nn.Module,
    tokenizer: Any,
    training_samples: Sequence[tuple[Text, Text] | ContrastPair],
    layers: int | Sequence[int] | None = None,
    layer_type: str = "decoder_block",
    layer_config: SiteConfig = None,
    read_token_index: ReadIndex = -1,
    batch_size: int = 1,
    show_progress: bool = False,
    aggregator: Aggregator | None = None,
) -> SteeringVector:
    """Train a steering vector from contrast pairs (steering-vectors' ``train_steering_vector``).

    :func:`~steering_opt.contrastive.contrastive_vector` with these arguments (see
    :func:`~steering_opt.contrastive.extract_activations` for their meaning); ``aggregator`` defaults to
    :func:`~steering_opt.contrastive.mean_aggregator` (CAA).

    Returns:
        A :class:`~steering_opt.vector.SteeringVector` with one vector per layer (``metadata["method"] ==
        "contrastive"``). Apply it with ``.apply(model, ...)`` (pass the same ``layer_config`` if you used one).
    """
    return contrastive_vector(model, tokenizer, training_samples, layers, aggregator=aggregator,
                              layer_type=layer_type, layer_config=layer_config, read_token_index=read_token_index,
                              batch_size=batch_size, show_progress=show_progress)
