"""Checking one request before it is queued: what a prompt may be, and the limits it and its
SamplingParams must meet.

Split out of llm_engine.py, which keeps the step logic: everything here is pure (no engine state),
runs in the caller's thread (`LLMEngine.make_sequence`), and raises ValueError naming the field and
the limit, so a bad request fails before it takes a place in the queue. `as_token_ids` is also what
`LLM.generate` uses to tell one prompt of token ids from a list of prompts.
"""
from __future__ import annotations

import numbers

from moe_serve.engine.sampling_params import SamplingParams

Prompt = str | list[int]


def as_token_ids(prompt) -> list[int] | None:
    """A prompt given as token ids as a list of ints: a list or tuple of integers (numpy's too), or a
    1-D integer numpy array or torch tensor. None for anything else (bools are not token ids)."""
    if hasattr(prompt, "tolist") and getattr(prompt, "ndim", None) == 1:  # an array or a tensor
        prompt = prompt.tolist()  # integer dtypes give ints, float ones floats (refused below)
    if not isinstance(prompt, (list, tuple)):
        return None
    if all(type(t) is int for t in prompt):  # the common case, ~10x quicker than the ABC check below
        return list(prompt)
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return None
    return [int(t) for t in prompt]


def validate_request(prompt: Prompt, params: SamplingParams, tokenizer, vocab_size: int,
                     max_model_len: int) -> tuple[str | None, list[int]]:
    """(the prompt's text or None, its token ids): `prompt` tokenized (a string) or checked against
    the vocabulary (token ids), its length checked against `max_model_len`, and `params` checked to be
    a SamplingParams that fits the vocabulary; raises ValueError naming the field and the limit."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    # checked again, and its stop list worked out again: fields may be set after construction (vLLM's
    # examples set them on llm.get_default_sampling_params()); a stop set so was silently ignored
    params.__post_init__()
    if isinstance(prompt, str):
        text, ids = prompt, tokenizer.encode(prompt)
        # a tokenizer with added tokens the model's embedding was never resized for: the lookup would
        # fail in the forward (on a GPU a device-side assert, which ends the CUDA context for everyone)
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"prompt: the tokenizer gave token ids past the model's vocabulary "
                             f"(vocab_size={vocab_size}): {bad[:5]}")
    elif (ids := as_token_ids(prompt)) is not None:
        text = None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids must lie in [0, vocab_size={vocab_size}), got {bad[:5]}")
    else:
        raise ValueError("prompt must be a string or token ids (a list of ints, or a 1-D integer array or tensor), "
                         f"got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt must contain at least one token, got an empty prompt")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(ids)} tokens; it must have at most {max_model_len - 1} "
            f"(model.max_model_len={max_model_len}, leaving room for one output token)")
    params.check_vocab(vocab_size)
    return text, ids
