"""The ``steering-opt demo`` command (``make demo``): one-shot steering on the embedded model.

From ONE datapoint — a harmless chat request, the model's own helpful answer (suppressed) and a refusal
(promoted) — optimise a steering vector at one layer, then print unsteered vs steered answers on the
training prompt and on prompts it never saw. The task, layer and hyper-parameters were chosen by
measurement on SmolLM2-135M-Instruct (layer 6, lr 0.1, 30 steps: the refusal generalises to every
held-out prompt; English→Spanish, the reference tutorial's task, gives mostly broken Spanish on a model
this small, see the README).
"""

from __future__ import annotations

import logging
import time
from typing import cast

import torch
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from .compat.llm_steering_opt import hf_hooks_contextmanager, make_steering_hook_hf, optimize_vector
from .data import TrainingDatapoint
from .models import load_model

__all__ = ["DEMO_PROMPT", "HELD_OUT", "chat_completion", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_PROMPT = "Give me a short recipe for pancakes."
REFUSAL = "I'm sorry, but I can't help with that request."
HELD_OUT = [
    "What are some good hobbies to try?",
    "Tell me about the moon.",
    "Write a haiku about autumn.",
]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str) -> str:
    """The chat-template text of one user turn, ready for generation."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                         add_generation_prompt=True)
    return cast(str, text)  # tokenize=False: a str


def chat_completion(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    user_message: str,
    *,
    max_new_tokens: int = 60,
    hooks: list | None = None,
) -> str:
    """Greedy chat completion of one user message (chat template applied), under optional steering hooks."""
    text = chat_prompt(tokenizer, user_message)
    enc = tokenizer(text, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    with hf_hooks_contextmanager(model, hooks or []), torch.no_grad():
        # causal-LM classes mix in GenerationMixin; PreTrainedModel itself does not declare generate()
        out = cast(GenerationMixin, model).generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                                    pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return cast(str, answer).strip()  # one sequence of ids: a str


def run_demo(
    model_name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    max_new_tokens: int = 40,
    layer: int = 6,
    max_iters: int = 30,
    lr: float = 0.1,
    prompt: str = DEMO_PROMPT,
) -> dict:
    """Optimise a refusal-inducing vector from one datapoint and print steered vs unsteered answers.

    Returns a dict with the vector, the optimisation ``info`` and the generations.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    start = time.perf_counter()
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    where = f"{model.dtype}, {next(model.parameters()).device}"
    print(f"Model: {model_name or 'SmolLM2-135M-Instruct (embedded)'} [{where}], "
          f"loaded in {time.perf_counter() - start:.1f} s")

    helpful = chat_completion(model, tokenizer, prompt, max_new_tokens=25)
    dp = TrainingDatapoint(chat_prompt(tokenizer, prompt), src_completions=[helpful], dst_completions=[REFUSAL])
    print(f"\nOne training datapoint:\n  user: {prompt}\n  suppress (the model's own answer): {helpful!r}"
          f"\n  promote: {REFUSAL!r}")
    start = time.perf_counter()
    vector, info = optimize_vector(model, [dp], layer, tokenizer=tokenizer, max_iters=max_iters, lr=lr, seed=0,
                                   progress=True)
    hist = info["loss_history"]
    print(f"\nOptimised a vector at layer {layer}: {info['iters']} steps in {time.perf_counter() - start:.1f} s, "
          f"loss {hist[0]:.2f} -> {info['loss']:.2f} nats, norm {info['norm']:.1f}")
    hooks = [(layer, make_steering_hook_hf(vector))]
    outputs = []
    for i, user in enumerate([prompt] + HELD_OUT):
        tag = "training prompt" if i == 0 else "never seen in training"
        before = chat_completion(model, tokenizer, user, max_new_tokens=max_new_tokens)
        after = chat_completion(model, tokenizer, user, max_new_tokens=max_new_tokens, hooks=hooks)
        print(f"\n[{tag}] user: {user}\n  unsteered: {before!r}\n  steered:   {after!r}")
        outputs.append({"prompt": user, "unsteered": before, "steered": after})
    return {"vector": vector, "info": info, "outputs": outputs}
