"""Write notebooks/evaluation.ipynb (evaluate, sweep and auto_steer on the embedded model) and execute it.

Usage: python tools/build_evaluation.py   (writes the notebook with its outputs; about 2-3 minutes on 2 CPU cores)
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
    ("md", """# Does the steering work? Evaluation, sweeps and `auto_steer`

A steering vector is only worth something if it changes behaviour on prompts it never saw while the text
stays fluent. This notebook measures that on the embedded **SmolLM2-135M-Instruct** (CPU): one training
datapoint (a harmless chat request; promote a refusal, suppress the model's helpful answer), then

1. `steering_opt.evaluate`: steered vs unsteered generations on held-out prompts, success (a refusal scorer),
   fluency, perplexity, the promoted/suppressed completions' log-prob shift and KL on neutral prompts;
2. a strength sweep (success vs strength);
3. `steering_opt.auto_steer`: layer and strength chosen by measurement, with the table it chose from.

Log-probabilities and KL are in **nats**."""),
    ("code", """import torch
import steering_opt

torch.set_num_threads(1)  # a shared 2-core machine: one thread is fastest
model, tokenizer = steering_opt.load_model()

def chat(text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

REFUSAL = "I'm sorry, but I can't help with that request."
HELPFUL = "Sure, here's a simple recipe for a classic pancake:"
datapoint = steering_opt.TrainingDatapoint(chat("Give me a short recipe for pancakes."),
                                           src_completions=[HELPFUL], dst_completions=[REFUSAL])
layer = 6
vector, info = steering_opt.optimize_vector(model, [datapoint], layer, tokenizer=tokenizer, max_iters=30, lr=0.1,
                                            seed=0)
steering = steering_opt.SteeringVector.from_optimization(vector, info, layer)
print(steering, "| loss", round(info["loss_history"][0], 1), "->", round(info["loss"], 2), "nats")
steering_opt.plot_loss_curve(info)"""),
    ("md", """## `evaluate`: held-out prompts

Prompts are plain strings here with `chat=True` (each becomes one user turn of the chat template); lists of
`{"role", "content"}` messages work too. `scorer="refusal"` is a built-in offline scorer (refusal phrases at
the start of the answer); others: `"language:es"` (py3langid), `"sentiment:negative"` (VADER),
`"keywords:a,b"`, or any function `(completion, prompt) -> [0, 1]`."""),
    ("code", """HELD_OUT = ["What are three fun things to do on a rainy day?", "Explain how a rainbow forms.",
            "Write a short poem about the sea.", "How do I make a cup of green tea?",
            "Suggest a name for a pet goldfish.", "What is the capital of Australia?"]
result = steering_opt.evaluate(model, tokenizer, steering, HELD_OUT, chat=True, scorer="refusal",
                               promote=[REFUSAL], suppress=[HELPFUL], max_new_tokens=24)
print(result)
print(result.show(3, width=90))"""),
    ("code", """{k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.summary.items()}"""),
    ("md", """Each record holds one prompt's steered and unsteered text and every metric (`result.to_pandas()` gives a
DataFrame when pandas is installed):"""),
    ("code", """{k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.records[0].items()}"""),
    ("md", """## Success vs strength

`steering_opt.sweep` builds one vector per (layer, variant) and measures it at every multiplier on validation
prompts (by default a built-in set of generic prompts, in the datapoint's chat/plain format). Here the vector
is the one above (`method=` any function returning a SteeringVector), so only the strength varies."""),
    ("code", """strength = steering_opt.sweep(model, tokenizer, [datapoint], layers=[layer], multipliers=[0.25, 0.5, 1.0, 1.5],
                              method=lambda model, tok, train, layer_: steering, scorer="refusal",
                              max_new_tokens=20)
print(strength.to_markdown(["multiplier", "success_rate", "fluent_success_rate", "kl", "perplexity", "margin_gain"]))
strength.plot_strength("success_rate")"""),
    ("md", """## `auto_steer`: from the datapoint to steering that works

It optimises a vector at each candidate layer (default: 15/25/35/45% of the depth; two here to keep the
notebook short) with 8 L-BFGS iterations, measures each at strength 1 on the generic validation prompts by the
promoted completions' log-prob gain over the suppressed ones (nats per token), and the best one also at the
other strengths; configurations whose KL on neutral prompts exceeds `kl_budget` (3 nats) rank last. Last, the
choice generates a few tokens on six validation prompts and is weakened (×0.75, ×0.5) while it makes the model
repeat itself (the log-prob signal cannot see that). It returns the best vector already scaled, with the table it
chose from. Pass `scorer=` to judge the best
candidates by generation instead, and `time_budget_s=` to bound the time."""),
    ("code", """auto_vector, report = steering_opt.auto_steer(model, tokenizer, [datapoint], layers=[4, 8],
                                              multipliers=[0.5, 0.75, 1.0, 1.5], time_budget_s=120)
print(report)
print(report.to_markdown(["layer", "multiplier", "norm", "margin_gain", "kl", "criterion"]))
report.plot_heatmap()"""),
    ("code", """check = steering_opt.evaluate(model, tokenizer, auto_vector, HELD_OUT, chat=True, scorer="refusal",
                              max_new_tokens=24, neutral_prompts=None)
print(check)
print(check.show(3, width=90))"""),
    ("md", """The quality benchmark (`benchmarks/bench_quality.py`, results in `benchmarks/RESULTS.md`) runs this on eight
tasks with 24 held-out prompts each and compares optimised vectors, CAA, prompting, the behaviour induced directly
(the ceiling) and `auto_steer`."""),
]


def build(execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in CELLS:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    path = ROOT / "notebooks" / "evaluation.ipynb"
    if execute:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
        clean_outputs(nb)  # progress-bar fragments out, stream outputs merged
    nbformat.write(nb, str(path))
    return path


if __name__ == "__main__":
    print(build(execute="--no-execute" not in sys.argv))
