"""Sampling semantics, OpenAI's API's, whatever keras_hub sampler is compiled
in: a temperature of 0 is greedy (keras_hub's samplers divide the logits by
it, which makes NaNs and so token 0 every time); a negative temperature, a
top_k below 1 and a top_p outside (0, 1] are refused."""

import math
import numbers

import jax.numpy as jnp
import keras_hub


def check_sampler(sampler):
    """Refuses, in one line naming the value, a sampler generate() cannot run
    or whose settings mean nothing."""
    if type(sampler).__call__ is not keras_hub.samplers.Sampler.__call__:
        raise ValueError(
            f"{type(sampler).__name__} searches over whole sequences, which tp_zoo's generate() does "
            "not do; use a sampler that picks token by token: 'greedy', 'top_k', 'top_p' or 'random'."
        )
    temperature = sampler.temperature
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: must be a finite number of at least 0 (0 is greedy).")
    top_k = getattr(sampler, "k", None)  # TopKSampler's, and TopPSampler's optional cut before top_p
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be a whole number of at least 1.")
    top_p = getattr(sampler, "p", None)
    if top_p is not None and not (_is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: must be a number in (0, 1].")


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def next_tokens(sampler, logits):
    """Each row's next token (batch,) from its logits (batch, vocab)."""
    if sampler.temperature == 0:
        return jnp.argmax(logits.astype("float32"), axis=-1).astype("int32")
    return sampler.get_next_token(sampler.compute_probabilities(logits)).astype("int32")
