"""The ``steering-opt demo`` command: a short, self-contained tour on the embedded model.

For now it loads the model and prints the unsteered chat completion of a fixed prompt; steering
will be added to it.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .models import load_model

__all__ = ["DEMO_PROMPT", "chat_completion", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_PROMPT = "Give me three tips for staying focused while studying."


def chat_completion(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    user_message: str,
    *,
    max_new_tokens: int = 60,
) -> str:
    """Greedy chat completion of one user message (chat template applied), decoded without specials."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_demo(
    model_name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    max_new_tokens: int = 60,
    prompt: str = DEMO_PROMPT,
) -> str:
    """Load a model (default: the embedded SmolLM2-135M-Instruct) and print its unsteered answer.

    Returns the completion text.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    start = time.perf_counter()
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    loaded_in = time.perf_counter() - start
    where = f"{model.dtype}, {next(model.parameters()).device}"
    print(f"Model: {model_name or 'SmolLM2-135M-Instruct (embedded)'} [{where}], loaded in {loaded_in:.1f} s")
    print(f"\nUser: {prompt}\n")
    start = time.perf_counter()
    completion = chat_completion(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
    print(f"Unsteered completion ({time.perf_counter() - start:.1f} s):\n{completion}\n")
    return completion
