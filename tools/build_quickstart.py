"""Write notebooks/quickstart.ipynb (the seed tutorial redone on the embedded model) and execute it.

Usage: python tools/build_quickstart.py   (writes the notebook with its outputs)
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbclean import clean_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CELLS: list[tuple[str, str]] = [
    ("md", """# Quickstart: optimising a steering vector with `steering_opt`

This is the reference library's tutorial (English → Spanish steering), redone on the model that ships with
this package: **SmolLM2-135M-Instruct** (30 blocks, hidden size 576), on a CPU. Every call below is the
tutorial's own call; only the model loading differs. A 135M model is far weaker than the tutorial's
Gemma-2-2B, so expect rougher Spanish — the point here is the API and what each option does.

All losses are in **nats** (natural log)."""),
    ("code", """import torch
import steering_opt
from steering_opt import steering_opt  # the tutorial's import style also works

torch.manual_seed(0)
model, tokenizer = steering_opt.load_model()  # embedded SmolLM2-135M-Instruct, float32, frozen, eval mode
print(model.config.model_type, steering_opt.num_layers(model), "layers, hidden size", steering_opt.hidden_size(model))"""),
    ("md", """## Task definition: natural language switching

A prompt, the completion the model gives (English), and its Spanish translation."""),
    ("code", """prompt = "Some of my fondest childhood memories are from my summer vacations back when I was little. Every now and then, after a long day of playing outside, I would come back home to be greeted with the delicious smell of my grandma's hazelnut cake wafting out of the kitchen. In this recipe, I'll teach you how to make that very cake, and create your own summer memories.\\n\\n"

generated_tokens = model.generate(**tokenizer(prompt, return_tensors='pt'), max_new_tokens=15, do_sample=False)
print(tokenizer.batch_decode(generated_tokens, skip_special_tokens=True)[0].replace(prompt, ""))"""),
    ("code", """en_completion = \"\"\"<h2>Ingredients</h2>

* 1 cup of all-purpose flour\"\"\"

es_completion = \"\"\"<h2>Ingredientes</h2>

* 1 taza de harina común\"\"\"

datapoint = steering_opt.TrainingDatapoint(
    prompt,
    src_completions=[en_completion],  # completions whose probability we want to decrease
    dst_completions=[es_completion],  # completions whose probability we want to increase
)"""),
    ("md", """## Optimising a vector

`optimize_vector` returns the vector and an `info` dict: `iters` (optimiser steps — exactly `max_iters`),
`loss` (nats, of the returned vector), `norm`, `loss_history` (every evaluation), `status`."""),
    ("code", """layer = 10
vector, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer,
    tokenizer=tokenizer,
    max_iters=20,
    lr=0.1,
    seed=0,
)
print({k: loss_info[k] for k in ("iters", "loss", "norm", "status")})"""),
    ("code", """def show(prompt2, hooks, max_new_tokens=30, **kw):
    with steering_opt.hf_hooks_contextmanager(model, hooks):
        out = model.generate(**tokenizer(prompt2, return_tensors='pt'), max_new_tokens=max_new_tokens, do_sample=False, **kw)
    print(repr(tokenizer.batch_decode(out, skip_special_tokens=True)[0][len(prompt2):]))

steering_hook = (layer, steering_opt.make_steering_hook_hf(vector))
print("--- unsteered ---"); show(prompt, [])
print("--- steered ---");   show(prompt, [steering_hook])
for p in ["My favorite sports are", "Here is how I like to spend my weekends:"]:
    print("--- unsteered ---"); show(p, [])
    print("--- steered ---");   show(p, [steering_hook])"""),
    ("md", """Subtracting the vector pushes the other way:"""),
    ("code", """show("Unos de mis deportes favoritos incluyen", [])
show("Unos de mis deportes favoritos incluyen", [(layer, steering_opt.make_steering_hook_hf(-vector))])"""),
    ("md", """## Norm-constrained steering (`max_norm`)"""),
    ("code", """vector, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer, tokenizer=tokenizer, max_iters=20, lr=0.1, seed=0,
    max_norm=20,
)
print({k: loss_info[k] for k in ("iters", "loss", "norm")})
show("My favorite programming languages are", [(layer, steering_opt.make_steering_hook_hf(vector))])"""),
    ("md", """## Early stopping with `target_loss`

Optimisation stops at the first evaluation whose summed loss is ≤ `target_loss` (held for
`target_loss_target_iters` consecutive evaluations); the returned vector is the one that met it.
`max_iters` is a safety cap here."""),
    ("code", """vector, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer, tokenizer=tokenizer, lr=0.1, seed=0,
    target_loss=40, max_iters=100,
)
print({k: loss_info[k] for k in ("iters", "loss", "norm", "status")})"""),
    ("md", """## Clamp steering (`vector_clamp`)

Instead of adding `v`, set the activation's component along `v̂` to `c·v`: `h ← h − (h·v̂)v̂ + c·v`.
To steer with a clamp vector use `make_steering_hook_hf(c * v, make_abl_mat(v))`."""),
    ("code", """vector, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer, tokenizer=tokenizer, lr=0.1, seed=0,
    target_loss=40, max_iters=100, vector_clamp=1,
)
print({k: loss_info[k] for k in ("iters", "loss", "norm", "status")})
show("My favorite programming languages are",
     [(layer, steering_opt.make_steering_hook_hf(vector, steering_opt.make_abl_mat(vector)))])"""),
    ("md", """## Affine steering (`affine_rank`)

Learn `h ← h + h Mᵀ + v` with a rank-r `M = LᵀR`; rows of L and R are kept at norm ≤ `max_affine_norm`."""),
    ("code", """vector, matrix, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer, tokenizer=tokenizer, max_iters=20, lr=0.1, seed=0,
    affine_rank=2, max_affine_norm=2, max_norm=1,
)
print({k: loss_info[k] for k in ("iters", "loss", "norm")}, "rank(M) =", torch.linalg.matrix_rank(matrix).item())
show("My favorite programming languages are", [(layer, steering_opt.make_steering_hook_hf(vector, matrix))])"""),
    ("md", """## The most likely steered completions (`sample_most_likely_completions_hf`)

A beam search for the `k` most likely continuations of `iters + 1` tokens, under whatever hooks are active."""),
    ("code", """vector, loss_info = steering_opt.optimize_vector(model, [datapoint], layer, tokenizer=tokenizer, max_iters=20, lr=0.1, seed=0)
prompt2 = '"How dare you cheat on me with him!" Jim roared.'
with steering_opt.hf_hooks_contextmanager(model, [(layer, steering_opt.make_steering_hook_hf(vector))]):
    completions, per_token_probabilities = steering_opt.sample_most_likely_completions_hf(
        model, tokenizer, prompt2, k=5, iters=5, coldness=1)
for completion, probs in zip(completions, per_token_probabilities):
    print(repr(completion), probs.round(3))"""),
    ("md", """## Log-probabilities of completions (`get_completion_logprob_hf`) and per-completion targets

The dst loss is `−log p(completion)`, the src loss `−Σ log(1 − p_t)`. Use the unsteered model's values as
targets: we want the Spanish completion at least as likely as the English one was, and the English one at
least as unlikely as the Spanish one was. With `do_target_loss_sum=False` every completion must meet the
target, and `info['loss'][i][j][k]` is the loss of datapoint i, src (j=0) / dst (j=1), completion k."""),
    ("code", """en_completion_logprob = steering_opt.get_completion_logprob_hf(model, prompt, en_completion, tokenizer).item()
es_completion_logprob = steering_opt.get_completion_logprob_hf(model, prompt, es_completion, tokenizer, do_one_minus=True).item()
print(en_completion_logprob, es_completion_logprob)

vector, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer, tokenizer=tokenizer, lr=0.1, seed=0, max_iters=100,
    target_loss=min(-en_completion_logprob, -es_completion_logprob),
    do_target_loss_sum=False,
)
print(loss_info['iters'], loss_info['loss'], loss_info['status'])"""),
    ("md", """## Noisy steering (`noise_scale`)

Gaussian noise is added to the vector at every evaluation (by default projected orthogonal to the gradient
of the unsteered loss); `target_loss_target_iters` requires the target to hold for several consecutive
evaluations."""),
    ("code", """vector, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer, tokenizer=tokenizer, lr=0.1, seed=0,
    target_loss=40, max_norm=30, noise_scale=0.1, target_loss_target_iters=5, max_iters=100,
)
print({k: loss_info[k] for k in ("iters", "loss", "norm", "status")})"""),
    ("md", """## Output-constrained steering (`do_output_constr`)

Phase 1 optimises until the target loss; phase 2 minimises the vector's norm while keeping the loss at or
below the target (modified differential method of multipliers). `info` reports the norm before and after,
the phase-2 iterations and whether the constraints still hold."""),
    ("code", """vector, loss_info = steering_opt.optimize_vector(
    model, [datapoint], layer, tokenizer=tokenizer, lr=0.1, seed=0, max_iters=100,
    target_loss=40,
    do_output_constr=True, output_constr_lr=0.05, max_output_constr_iters=60,
)
print({k: loss_info[k] for k in ("iters", "loss", "norm_before_output_constr", "norm", "output_constr_iters", "constraints_satisfied")})"""),
    ("md", """## One vector per layer (`optimize_vectors`)

Jointly optimise a vector at every layer with L1, sparsity and entropy regularisers that push the
steering into a few layers."""),
    ("code", """layers = list(range(steering_opt.num_layers(model)))
vectors, loss_info = steering_opt.optimize_vectors(
    model, [datapoint], layers, tokenizer=tokenizer, max_iters=20, lr=0.03, seed=0,
    regularization_weight=0.1, sparsity_weight=0.1, entropy_weight=10, regularization_type="l1",
)
print("loss", round(loss_info["loss"], 2))
print({layer: round(n, 2) for layer, n in loss_info["norms"].items()})"""),
    ("md", """## Loss curve

`info['loss_history']` holds the loss (nats) at every evaluation; `plot_loss_curve` draws it (matplotlib, the
`plot` extra). The figure is the cell's result: no `%matplotlib inline` needed."""),
    ("code", """vector, loss_info = steering_opt.optimize_vector(model, [datapoint], layer, tokenizer=tokenizer, max_iters=30, lr=0.1, seed=0)
steering_opt.plot_loss_curve(loss_info, title=f"English -> Spanish, layer {layer}")"""),
    ("code", """# Evaluation: does the last vector work on prompts it never saw, and is the text still fluent?
# (steered vs unsteered greedy generations, Spanish detected by py3langid, distinct-2 and real Spanish words,
#  the Spanish completion's log-prob gain over the English one, KL on neutral prompts; see notebooks/evaluation.ipynb)
result = steering_opt.evaluate(
    model, tokenizer, steering_opt.SteeringVector.from_optimization(vector, loss_info, layer),
    ["My favorite sports are", "Here is how I like to spend my weekends:", "The weather today is"],
    scorer="language:es", promote=[es_completion], suppress=[en_completion], max_new_tokens=24,
)
print(result)
print(result.show(width=90))"""),
]


def build(execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in CELLS:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    path = ROOT / "notebooks" / "quickstart.ipynb"
    if execute:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
        clean_outputs(nb)  # progress-bar fragments out, stream outputs merged
    nbformat.write(nb, str(path))
    return path


if __name__ == "__main__":
    print(build(execute="--no-execute" not in sys.argv))
