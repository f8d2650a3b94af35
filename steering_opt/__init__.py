"""steering_opt: find, apply, save and evaluate steering vectors for HuggingFace language models.

Quick start::

    import steering_opt
    model, tok = steering_opt.load_model()             # embedded SmolLM2-135M-Instruct
    dp = steering_opt.TrainingDatapoint(prompt, src_completions=[en], dst_completions=[es])
    vector, info = steering_opt.optimize_vector(model, [dp], 10, tokenizer=tok, max_iters=20, lr=0.1)
    with steering_opt.hf_hooks_contextmanager(model, [(10, steering_opt.make_steering_hook_hf(vector))]):
        model.generate(...)

``import steering_opt`` is cheap: it imports no submodule (and so neither torch nor transformers). A public name is
imported from its submodule on first use (PEP 562 ``__getattr__`` over ``_EXPORTS`` below); any submodule is also
reachable as an attribute (``steering_opt.arch``), as it was when this file imported everything.

To move a public name to another module, change its entry in ``_EXPORTS`` and its line in the ``TYPE_CHECKING``
block; ``tests/test_layout.py`` checks that ``_EXPORTS``, ``__all__`` and that block agree and that every entry
resolves.
"""

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Public name -> the submodule (relative to this package) that defines it.
# A name equal to its submodule's name (``evaluate``, ``sweep``) is that submodule itself: the import system binds
# submodules as package attributes, so the module must be callable (``steering_opt.util.CallableModule``).
_EXPORTS: dict[str, str] = {
    # architecture knowledge
    "SITES": "arch",
    "get_blocks": "arch",
    "get_site_module": "arch",
    "hidden_size": "arch",
    "num_layers": "arch",
    "resolve_layer": "arch",
    # contrastive vectors, aggregators and operators
    "ContrastPair": "contrastive",
    "ablation_operator": "contrastive",
    "ablation_then_addition_operator": "contrastive",
    "addition_operator": "contrastive",
    "aggregate_activations": "contrastive",
    "extract_activations": "contrastive",
    "logistic_aggregator": "contrastive",
    "mean_aggregator": "contrastive",
    "pca_aggregator": "contrastive",
    "projection_operator": "contrastive",
    "train_steering_vector": "contrastive",
    # the optimiser core: options, parameterisations, results
    "optimize": "optimize",
    "OptimizeOptions": "options",
    "OptimizeResult": "loop",
    "Steering": "parameterization",
    "Additive": "parameterization",
    "Clamp": "parameterization",
    "Affine": "parameterization",
    # data, objectives
    "TrainingDatapoint": "data",
    "Objective": "engine",
    # evaluation
    "EvalResult": "evaluate",
    "Evaluator": "evaluate",
    "completion_logprobs": "evaluate",
    "evaluate": "evaluate",
    "kl_divergence": "evaluate",
    "perplexity": "evaluate",
    "calibrate_strength": "kl",
    # hooks
    "frozen_model": "hooks",
    "hf_hooks_contextmanager": "compat.llm_steering_opt",
    "make_abl_mat": "compat.llm_steering_opt",
    "make_activs_hook_hf": "compat.llm_steering_opt",
    "make_steering_hook_hf": "compat.llm_steering_opt",
    "make_steering_hook_tflens": "compat.llm_steering_opt",
    "steer": "hooks",
    # injectors (rotalabs-steer compatible)
    "ActivationHook": "compat.rotalabs_steer",
    "ActivationInjector": "compat.rotalabs_steer",
    "MultiVectorInjector": "compat.rotalabs_steer",
    "generate_with_steering": "compat.rotalabs_steer",
    # data files
    "load_contrast_pairs": "jsonl",
    "load_datapoints": "jsonl",
    # models
    "load_model": "models",
    "load_tokenizer": "models",
    # optimisation
    "make_melbo_loss_funcs": "compat.melbo",
    "make_melbo_objective": "melbo",
    "optimize_completion": "compat.llm_steering_opt_legacy",
    "optimize_minibatch_completion_hf": "compat.llm_steering_opt_legacy",
    "optimize_vector": "compat.llm_steering_opt",
    "optimize_vector_minibatch_hf": "compat.llm_steering_opt",
    "optimize_vectors": "compat.llm_steering_opt",
    "Job": "scale",
    "optimize_many": "scale",
    # persistence and interop
    "SteeringFileError": "persist",
    "check_compatible": "persist",
    "export_gguf": "persist",
    "export_tensors": "persist",
    "import_gguf": "persist",
    "load": "persist",
    "save": "persist",
    # plots
    "plot_layer_norms": "plots",
    "plot_loss_curve": "plots",
    "plot_pca": "plots",
    # sampling
    "get_completion_logprob": "sampling",
    "get_completion_logprob_hf": "sampling",
    "sample_most_likely_completions_hf": "sampling",
    # scorers
    "KeywordScorer": "scorers",
    "LanguageScorer": "scorers",
    "RefusalScorer": "scorers",
    "SentimentScorer": "scorers",
    "get_scorer": "scorers",
    # sweeps
    "SweepResult": "sweep",
    "auto_steer": "sweep",
    "plot_success_vs_strength": "plots",
    "plot_sweep_heatmap": "plots",
    "sweep": "sweep",
    # steering vectors
    "SteeringVector": "vector",
}

__all__ = [
    "ActivationHook",
    "Additive",
    "Affine",
    "ActivationInjector",
    "Clamp",
    "ContrastPair",
    "EvalResult",
    "Evaluator",
    "Job",
    "KeywordScorer",
    "LanguageScorer",
    "MultiVectorInjector",
    "Objective",
    "OptimizeOptions",
    "OptimizeResult",
    "RefusalScorer",
    "SITES",
    "SentimentScorer",
    "Steering",
    "SteeringFileError",
    "SteeringVector",
    "SweepResult",
    "TrainingDatapoint",
    "ablation_operator",
    "ablation_then_addition_operator",
    "addition_operator",
    "aggregate_activations",
    "auto_steer",
    "calibrate_strength",
    "check_compatible",
    "completion_logprobs",
    "evaluate",
    "export_gguf",
    "export_tensors",
    "extract_activations",
    "frozen_model",
    "generate_with_steering",
    "get_blocks",
    "get_completion_logprob",
    "get_completion_logprob_hf",
    "get_scorer",
    "get_site_module",
    "hf_hooks_contextmanager",
    "hidden_size",
    "import_gguf",
    "kl_divergence",
    "load",
    "load_contrast_pairs",
    "load_datapoints",
    "load_model",
    "load_tokenizer",
    "logistic_aggregator",
    "make_abl_mat",
    "make_activs_hook_hf",
    "make_melbo_loss_funcs",
    "make_melbo_objective",
    "make_steering_hook_hf",
    "make_steering_hook_tflens",
    "mean_aggregator",
    "num_layers",
    "optimize",
    "optimize_completion",
    "optimize_many",
    "optimize_minibatch_completion_hf",
    "optimize_vector",
    "optimize_vector_minibatch_hf",
    "optimize_vectors",
    "pca_aggregator",
    "perplexity",
    "plot_layer_norms",
    "plot_loss_curve",
    "plot_pca",
    "plot_success_vs_strength",
    "plot_sweep_heatmap",
    "projection_operator",
    "resolve_layer",
    "sample_most_likely_completions_hf",
    "save",
    "steer",
    "sweep",
    "train_steering_vector",
]

# The same names imported for real, so that type checkers and IDEs see them. ``evaluate``, ``optimize`` and ``sweep``
# are typed as the functions; at run time they are the callable modules.
if TYPE_CHECKING:
    from .arch import SITES, get_blocks, get_site_module, hidden_size, num_layers, resolve_layer
    from .compat.llm_steering_opt import (
        hf_hooks_contextmanager,
        make_abl_mat,
        make_activs_hook_hf,
        make_steering_hook_hf,
        make_steering_hook_tflens,
        optimize_vector,
        optimize_vector_minibatch_hf,
        optimize_vectors,
    )
    from .compat.llm_steering_opt_legacy import optimize_completion, optimize_minibatch_completion_hf
    from .compat.melbo import make_melbo_loss_funcs
    from .compat.rotalabs_steer import ActivationHook, ActivationInjector, MultiVectorInjector, generate_with_steering
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
    from .hooks import frozen_model, steer
    from .jsonl import load_contrast_pairs, load_datapoints
    from .kl import calibrate_strength
    from .loop import OptimizeResult
    from .melbo import make_melbo_objective
    from .models import load_model, load_tokenizer
    from .optimize import optimize
    from .options import OptimizeOptions
    from .parameterization import Additive, Affine, Clamp, Steering
    from .persist import SteeringFileError, check_compatible, export_gguf, export_tensors, import_gguf, load, save
    from .plots import plot_layer_norms, plot_loss_curve, plot_pca, plot_success_vs_strength, plot_sweep_heatmap
    from .sampling import get_completion_logprob, get_completion_logprob_hf, sample_most_likely_completions_hf
    from .scale import Job, optimize_many
    from .scorers import KeywordScorer, LanguageScorer, RefusalScorer, SentimentScorer, get_scorer
    from .sweep import SweepResult, auto_steer, sweep
    from .vector import SteeringVector
else:  # kept from type checkers, which would otherwise accept any attribute of the package

    def __getattr__(name: str) -> Any:
        """Import a public name (or a submodule) on first access, then cache it in the package."""
        module_name = _EXPORTS.get(name)
        if module_name is None:
            if name.startswith("_"):  # never guess at dunders (``__main__`` would run the CLI)
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
            try:  # a submodule: ``import steering_opt; steering_opt.arch`` worked when everything was imported
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        if "ipykernel" in sys.modules:  # Jupyter: silence tqdm's "IProgress not found" before transformers loads
            importlib.import_module(f"{__name__}.progress")
        module = importlib.import_module(f"{__name__}.{module_name}")
        value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        import pkgutil

        submodules = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
        return sorted(set(globals()) | set(__all__) | submodules)
