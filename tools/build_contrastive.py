"""Write notebooks/contrastive.ipynb (contrastive vectors, the seed-000/003/004 recipes, CAA vs an optimised
vector, one steering API) and execute it.

Usage: python tools/build_contrastive.py [--no-execute]   (writes the notebook with its outputs)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbclean import clean_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "contrastive.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Contrastive steering vectors, and one steering API for every method

Classic recipes find a steering vector from *contrast pairs*: run texts that show a behaviour and matched texts
that don't, read an activation per text, and take the difference. This notebook redoes three such recipes with
`steering_opt`, on the model that ships with the package (**SmolLM2-135M-Instruct**, 30 blocks, hidden size 576,
on a CPU):

* the politeness vector of a blog post (mean difference + PCA plot),
* the `steering-vectors` library API (`train_steering_vector`, aggregators, operators, `.apply`),
* a chat-template dataset with last-token vectors at every layer and a per-layer sweep (as in LLM-Steering-Using-Steering-Vectors),

and then puts the contrastive (CAA) vector side by side with a vector found by gradient descent
(`optimize_vector`) on the same data. Both are `SteeringVector`s and go through the same `.apply`, injectors,
arithmetic and plots.

Layer convention: layer `L` means the residual stream *entering* block `L` (`hidden_states[L]`), both when
reading activations and when steering. (steering-vectors reads block *outputs*: its layer `L` is our `L + 1`.)"""),
    ("code", """import torch
import steering_opt as so

torch.manual_seed(0)
model, tok = so.load_model()  # embedded SmolLM2-135M-Instruct: float32, frozen, eval mode
print(model.config.model_type, so.num_layers(model), "layers, hidden size", so.hidden_size(model))"""),
    ("md", """## 1. The blog recipe: a politeness vector and its PCA plot

Polite requests vs. direct ones. We read the activation of each text's **last token** at one layer and take
the mean difference (polite − direct)."""),
    ("code", """polite = [
    "I would greatly appreciate it if you could explain the concept of machine learning to me when you have a moment.",
    "Would you be so kind as to share your thoughts on this approach? Thank you for your consideration.",
    "If it's not too much trouble, could you please clarify this point? I'd be most grateful for your insights.",
    "Could you please send me the report when you get a chance? Many thanks in advance.",
    "I'm so sorry to bother you, but would you mind helping me with this form?",
    "Thank you kindly for your patience; may I ask you to review my draft?",
]
direct = ["Explain machine learning to me now.", "Tell me what you think about this approach.",
          "Clarify this point immediately.", "Send me the report.", "Help me with this form.", "Review my draft."]
pairs = list(zip(polite, direct))

LAYER = 8
pos, neg = so.extract_activations(model, tok, pairs, layers=[LAYER], batch_size=12)  # {layer: (6, 576)} each
politeness = so.aggregate_activations(pos, neg)[LAYER]                               # mean of the differences
print("polite/direct activations:", tuple(pos[LAYER].shape), "| vector norm", round(politeness.norm().item(), 1))"""),
    ("code", """so.plot_pca(pos, neg, layer=LAYER, labels=("Polite", "Direct"), title=f"Politeness, layer {LAYER} (last token)")"""),
    ("md", """### Why the last token and not the sequence mean

The blog averages every token's activation over the sequence. In SmolLM2 (like many small models) the **first
token carries a massive activation**: from block ~12 on its residual norm is ~24,000 against ~200 for every other
token. Averaged over a sentence it dominates, so the mean-over-sequence vector is essentially that one direction,
weighted by how much shorter the direct sentences are: it encodes *length*, not politeness. Reading the last
token (the default, `read_token_index=-1`) avoids it. Measured at layer 15:"""),
    ("code", """L = 15
with so.ActivationHook(model, [L], component="residual", token_position="all") as hook, torch.no_grad():
    for text in polite + direct:
        model(**tok(text, return_tensors="pt"))
acts = dict(zip(polite + direct, [a[0] for a in hook.get_activations(concat=False)[L]]))  # text -> (seq, 576)
norms = torch.cat([a.norm(dim=-1) for a in acts.values()])
first = torch.stack([a[0] for a in acts.values()])
print(f"first-token norm: {first.norm(dim=-1).mean():.0f};  other tokens: median {torch.cat([a[1:].norm(dim=-1) for a in acts.values()]).median():.0f}")

naive = torch.stack([acts[t].mean(0) for t in polite]).mean(0) - torch.stack([acts[t].mean(0) for t in direct]).mean(0)
last = so.train_steering_vector(model, tok, pairs, layers=[L], batch_size=12).layer_activations[L]
u0 = first.mean(0) / first.mean(0).norm()
cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()
print(f"sequence-mean vector: norm {naive.norm():7.1f}, share of its energy on the first-token direction cos² = {cos(naive, u0)**2:.4f}")
print(f"last-token vector:    norm {last.norm():7.1f}, share of its energy on the first-token direction cos² = {cos(last, u0)**2:.4f}")"""),
    ("md", """## 2. The steering-vectors API

`train_steering_vector(model, tokenizer, pairs, layers=..., layer_type=..., aggregator=...)` returns a
`SteeringVector`. Aggregators: `mean_aggregator()` (CAA, default), `pca_aggregator()` (first principal
component of the differences, unit norm, pointing from negative to positive), `logistic_aggregator()`
(logistic-regression weights, fitted with torch) or any `(pos, neg) -> vector` function. On this data they
agree on the direction:"""),
    ("code", """vecs = {name: so.train_steering_vector(model, tok, pairs, layers=[LAYER], aggregator=agg, batch_size=12)
        for name, agg in [("mean", so.mean_aggregator()), ("pca", so.pca_aggregator()),
                          ("logistic", so.logistic_aggregator(normalize=True))]}
for a in vecs:
    print(f"{a:>8}: norm {vecs[a].layer_activations[LAYER].norm():6.2f} | cosine with", {
        b: round(cos(vecs[a].layer_activations[LAYER], vecs[b].layer_activations[LAYER]), 3) for b in vecs if b != a})"""),
    ("md", """`.apply(model, multiplier=..., min_token_index=..., token_indices=..., operator=...)` steers inside a
`with` block; `.patch(model)` returns a handle with `.remove()`. Operators: `addition_operator()` (default),
`ablation_operator()`, `ablation_then_addition_operator()`, `projection_operator(scale)` (LLM-Steering-Using-Steering-Vectors' projection
steering) or any `(activation, vector) -> delta`."""),
    ("code", """caa_blog = vecs["mean"]
prompt = [{"role": "user", "content": "Write a short message asking my neighbour to move his car."}]
print("unsteered:       ", repr(so.generate_with_steering(model, tok, prompt, None, max_new_tokens=25)))
with caa_blog.apply(model, multiplier=1.0):
    print("CAA x1 (apply):  ", repr(so.generate_with_steering(model, tok, prompt, None, max_new_tokens=25)))
handle = caa_blog.patch(model, multiplier=-1.0)
print("CAA x-1 (patch): ", repr(so.generate_with_steering(model, tok, prompt, None, max_new_tokens=25)))
handle.remove()
print("ablate direction:", repr(so.generate_with_steering(model, tok, prompt, caa_blog, operator=so.ablation_operator(), max_new_tokens=25)))"""),
    ("md", """## 3. Chat-template data, every layer, and a layer sweep

Samples can be chats (lists of `{"role", "content"}`): they are rendered with the tokenizer's chat template and,
when the last message is the assistant's, the answer is left open so the last token read is the answer's last
token. With `layers=None` we get one last-token vector per layer. We score a vector by how much it shifts the
held-out log-probability (nats) of a polite answer over a direct one."""),
    ("code", """train = [
    ("Ask your neighbour to move his car.", "Excuse me, would you mind moving your car a little, please? Thank you so much!", "Move your car."),
    ("Ask a colleague to send you the report.", "Could you please send me the report when you have a moment? Many thanks!", "Send me the report."),
    ("Ask the waiter for some water.", "Excuse me, could I please have some water? Thank you kindly!", "Water. Now."),
    ("Ask your friend to call you back.", "Whenever you have a moment, could you please call me back? Thanks so much!", "Call me back."),
    ("Ask a student to close the door.", "Would you be so kind as to close the door, please? Thank you!", "Close the door."),
    ("Ask your brother to lower the music.", "Sorry to bother you, but could you please turn the music down a bit? Thanks!", "Turn it down."),
]
held_out = [
    ("Ask your roommate to wash the dishes.", "Would you mind washing the dishes when you get a chance, please? Thank you!", "Wash the dishes."),
    ("Ask a stranger for the time.", "Excuse me, could you please tell me the time? Thank you very much!", "What time is it."),
    ("Ask your boss for a day off.", "Would it be possible for me to take a day off on Friday, please? Thank you for considering it!", "I'm taking Friday off."),
]
chat = lambda q, a=None: [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a else [])
chat_pairs = [so.ContrastPair(chat(q, p), chat(q, d)) for q, p, d in train]

caa_all = so.train_steering_vector(model, tok, chat_pairs, batch_size=12)   # layers=None: all 30 layers
prompt_text = lambda q: tok.apply_chat_template(chat(q), tokenize=False, add_generation_prompt=True)

def politeness_score(steering=None, multiplier=1.0, **apply_kwargs):
    \"\"\"Mean over held-out requests of log p(polite answer) - log p(direct answer), in nats.\"\"\"
    total = 0.0
    ctx = steering.apply(model, multiplier=multiplier, **apply_kwargs) if steering is not None else torch.no_grad()
    with ctx:
        for q, p, d in held_out:
            total += (so.get_completion_logprob_hf(model, prompt_text(q), p, tok)
                      - so.get_completion_logprob_hf(model, prompt_text(q), d, tok)).item()
    return total / len(held_out)

base_score = politeness_score()
print(f"unsteered score: {base_score:.1f} nats")
for layer in [2, 5, 8, 12, 16, 20]:
    one = so.SteeringVector({layer: caa_all.layer_activations[layer]})
    print(f"layer {layer:2d}: norm {one.layer_activations[layer].norm():5.1f} | score x0.5 {politeness_score(one, 0.5):6.1f}"
          f" | projection (scale 1) {politeness_score(one, operator=so.projection_operator(1.0)):6.1f}")"""),
    ("code", """so.plot_layer_norms(caa_all, title="CAA (last-token) vector norm per layer, chat data")"""),
    ("md", """## 4. CAA vs. an optimised vector, side by side

`optimize_vector` finds a vector at one layer by gradient descent on the same kind of data: make the polite
answer likely (`dst_completions`) and the direct one unlikely (`src_completions`). We use three of the training
requests and cap the norm at the CAA vector's norm. `SteeringVector.from_optimization` wraps the result."""),
    ("code", """caa = so.SteeringVector({LAYER: caa_all.layer_activations[LAYER]}, metadata={"method": "CAA"})
datapoints = [so.TrainingDatapoint(prompt_text(q), dst_completions=[p], src_completions=[d]) for q, p, d in train[:3]]
vector, info = so.optimize_vector(model, datapoints, LAYER, tokenizer=tok, max_iters=15, lr=0.2, seed=0,
                                  max_norm=caa.layer_activations[LAYER].norm().item())
opt = so.SteeringVector.from_optimization(vector, info, LAYER)
print(opt, "| final loss", round(info["loss"], 2), "nats")
so.plot_loss_curve(info, title="optimize_vector loss (nats)")"""),
    ("code", """print(f"cosine(CAA, optimised) = {cos(caa.layer_activations[LAYER], opt.layer_activations[LAYER]):.3f}")
print(f"{'':>14} {'norm':>6} {'held-out score (nats)':>22}")
print(f"{'unsteered':>14} {0:6.1f} {base_score:22.1f}")
for name, vec, m in [("CAA x0.5", caa, 0.5), ("CAA x1", caa, 1.0), ("optimised x1", opt, 1.0)]:
    print(f"{name:>14} {m * vec.layer_activations[LAYER].norm():6.1f} {politeness_score(vec, m):22.1f}")"""),
    ("code", """for q in ["Ask your sister to feed the cat.", "Tell my coworker to stop taking my lunch from the fridge."]:
    print(q)
    for name, vec in [("unsteered", None), ("CAA", caa), ("optimised", opt)]:
        print(f"  {name:>10}:", repr(so.generate_with_steering(model, tok, chat(q), vec, max_new_tokens=25)))"""),
    ("md", """The optimised vector raises the held-out score a lot at a smaller norm than CAA's: it was fitted to exactly
that objective (on other requests), while the CAA vector only points from direct to polite *activations*, and
that direction is nearly orthogonal to the optimised one. CAA changes the tone (warmer, "so glad") without
making the polite *request* more likely. On a 135M model neither produces reliably polite requests; the
comparison is the point. The plot of section 1 again, now with the optimised vector (green) drawn from the
direct centroid: its projection on the plane of the data's two principal components is tiny, because it is
nearly orthogonal to the contrastive direction."""),
    ("code", """so.plot_pca(pos, neg, layer=LAYER, steering=opt, labels=("Polite", "Direct"), title=f"Optimised vector vs. blog data, layer {LAYER}")"""),
    ("md", """## 5. One API: injectors and arithmetic work the same for both

`ActivationInjector` / `MultiVectorInjector` / `ActivationHook` (rotalabs-steer's names) are built on the same
`SteeringVector`; `set_strength` takes effect on the next forward without re-registering hooks, and
`injection_mode` (`"all"`, `"first"`, `"last"`, `"generated"`) selects the same tokens with and without a KV
cache. Vectors add and scale like tensors."""),
    ("code", """q = chat("Ask your sister to feed the cat.")
injector = so.MultiVectorInjector(model, {"caa": caa, "optimised": opt}, strengths={"caa": 0.0, "optimised": 1.0})
with injector:
    print("optimised only: ", repr(so.generate_with_steering(model, tok, q, None, max_new_tokens=20)))
    injector.set_strength("caa", 0.5); injector.set_strength("optimised", 0.5)
    print("half + half:    ", repr(so.generate_with_steering(model, tok, q, None, max_new_tokens=20)))
print("(caa + opt) / 2:", repr(so.generate_with_steering(model, tok, q, (caa + opt) / 2, max_new_tokens=20)))
with so.ActivationInjector(model, opt, strength=1.0, injection_mode="generated"):
    print("generated only: ", repr(so.generate_with_steering(model, tok, q, None, max_new_tokens=20)))
print("no hooks left:", all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()))"""),
    ("md", """Everything here also exists outside a notebook: `steering_opt.train_steering_vector` and friends in
`steering_opt/contrastive.py` (under steering-vectors' names in `steering_opt/compat/steering_vectors.py`),
the injectors and `generate_with_steering` in `steering_opt/compat/rotalabs_steer.py`, the plots in
`steering_opt/plots.py` (matplotlib is an optional extra), and vectors save/load with
`SteeringVector.save_pretrained` / `from_pretrained`."""),
]


def build(execute: bool = True, path: Path = NOTEBOOK, timeout: int = 600) -> Path:
    """Write the notebook to ``path`` (executed in a kernel started in the repository root, one torch thread)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in CELLS:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    if execute:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch in the kernel: 2 shared cores
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
        clean_outputs(nb)  # progress-bar fragments out, stream outputs merged
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


if __name__ == "__main__":
    t0 = time.time()
    out = build(execute="--no-execute" not in sys.argv)
    print(f"{out} ({time.time() - t0:.0f} s)")
