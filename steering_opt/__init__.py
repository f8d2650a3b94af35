"""steering_opt: find, apply, save and evaluate steering vectors for HuggingFace language models.

Quick start::

    import steering_opt
    model, tok = steering_opt.load_model()             # embedded SmolLM2-135M-Instruct
    dp = steering_opt.TrainingDatapoint(prompt, src_completions=[en], dst_completions=[es])
    vector, info = steering_opt.optimize_vector(model, [dp], 10, tokenizer=tok, max_iters=20, lr=0.1)
    with steering_opt.hf_hooks_contextmanager(model, [(10, steering_opt.make_steering_hook_hf(vector))]):
        model.generate(...)
"""

from .arch import SITES, get_blocks, get_site_module, hidden_size, num_layers, resolve_layer
from .contrastive import (
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
    train_steering_vector,
)
from .data import TrainingDatapoint
from .engine import Objective
from .evaluate import EvalResult, Evaluator, completion_logprobs, evaluate, kl_divergence, perplexity
from .hooks import frozen_model, hf_hooks_contextmanager, make_abl_mat, make_steering_hook_hf, steer
from .injectors import ActivationHook, ActivationInjector, MultiVectorInjector, generate_with_steering
from .jsonl import load_contrast_pairs, load_datapoints
from .models import load_model, load_tokenizer
from .optimize import make_melbo_loss_funcs, optimize_vector, optimize_vector_minibatch_hf, optimize_vectors
from .persist import SteeringFileError, check_compatible, export_gguf, export_tensors, import_gguf, load, save
from .plots import plot_layer_norms, plot_loss_curve, plot_pca
from .sampling import get_completion_logprob, get_completion_logprob_hf, sample_most_likely_completions_hf
from .scale import Job, optimize_many
from .scorers import KeywordScorer, LanguageScorer, RefusalScorer, SentimentScorer, get_scorer
from .sweep import SweepResult, auto_steer, plot_success_vs_strength, plot_sweep_heatmap, sweep
from .vector import SteeringVector

__version__ = "0.2.0"

__all__ = [
    "Job",
    "optimize_many",
    "SITES",
    "SteeringVector",
    "Objective",
    "TrainingDatapoint",
    "frozen_model",
    "get_blocks",
    "get_completion_logprob",
    "get_completion_logprob_hf",
    "get_site_module",
    "hf_hooks_contextmanager",
    "hidden_size",
    "load_model",
    "load_tokenizer",
    "make_abl_mat",
    "make_melbo_loss_funcs",
    "make_steering_hook_hf",
    "num_layers",
    "optimize_vector",
    "optimize_vector_minibatch_hf",
    "optimize_vectors",
    "resolve_layer",
    "sample_most_likely_completions_hf",
    "steer",
    # persistence and data files (persist.py, jsonl.py)
    "SteeringFileError",
    "check_compatible",
    "export_gguf",
    "export_tensors",
    "import_gguf",
    "load",
    "load_contrast_pairs",
    "load_datapoints",
    "save",
    # contrastive vectors, operators, injectors, plots (contrastive.py, injectors.py, plots.py)
    "ActivationHook",
    "ActivationInjector",
    "ContrastPair",
    "MultiVectorInjector",
    "ablation_operator",
    "ablation_then_addition_operator",
    "addition_operator",
    "aggregate_activations",
    "extract_activations",
    "generate_with_steering",
    "logistic_aggregator",
    "mean_aggregator",
    "pca_aggregator",
    "plot_layer_norms",
    "plot_loss_curve",
    "plot_pca",
    "projection_operator",
    "train_steering_vector",
    # evaluation, scorers, sweeps (evaluate.py, scorers.py, sweep.py; the modules stay importable as
    # `from steering_opt.evaluate import ...` / `from steering_opt.sweep import ...`)
    "EvalResult",
    "Evaluator",
    "KeywordScorer",
    "LanguageScorer",
    "RefusalScorer",
    "SentimentScorer",
    "SweepResult",
    "auto_steer",
    "completion_logprobs",
    "evaluate",
    "get_scorer",
    "kl_divergence",
    "perplexity",
    "plot_success_vs_strength",
    "plot_sweep_heatmap",
    "sweep",
]
