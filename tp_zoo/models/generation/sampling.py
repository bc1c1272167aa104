"""Sampling semantics, OpenAI's API's, whatever keras_hub sampler is compiled
in: a temperature of 0 is greedy (keras_hub's samplers divide the logits by
it, which makes NaNs and so token 0 every time); a negative temperature, a
top_k below 1 and a top_p outside (0, 1] are refused."""

import math
import numbers

import jax
import jax.numpy as jnp
import keras_hub

from tp_zoo.errors import RequestError


def check_sampler(sampler):
    """Refuses, in one line naming the value, a sampler generate() cannot run
    or whose settings mean nothing."""
    if type(sampler).__call__ is not keras_hub.samplers.Sampler.__call__:
        raise ValueError(
            f"{type(sampler).__name__} searches over whole sequences, which tp_zoo's generate() does "
            "not do; use a sampler that picks token by token: 'greedy', 'top_k', 'top_p' or 'random'."
        )
    check_temperature(sampler.temperature)
    top_k = getattr(sampler, "k", None)  # TopKSampler's, and TopPSampler's optional cut before top_p
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be a whole number of at least 1.")
    top_p = getattr(sampler, "p", None)
    if top_p is not None:
        check_top_p(top_p)


def check_temperature(temperature):
    """Refuses a temperature that is not a finite number of at least 0,
    naming it (a generate() sampler's, a served request's)."""
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"temperature={temperature!r}: must be a finite number of at least 0 (0 is greedy).",
                           param="temperature")


def check_top_p(top_p):
    """Refuses a top_p outside (0, 1], naming it."""
    if not (_is_real(top_p) and 0 < top_p <= 1):
        raise RequestError(f"top_p={top_p!r}: must be a number in (0, 1].", param="top_p")


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def next_tokens(sampler, logits):
    """Each row's next token (batch,) from its logits (batch, vocab)."""
    if sampler.temperature == 0:
        return jnp.argmax(logits.astype("float32"), axis=-1).astype("int32")
    return sampler.get_next_token(sampler.compute_probabilities(logits)).astype("int32")


def row_tokens(logits, temperature, top_k, top_p, seed_states, draws, cuts):
    """Each row's next token by its own settings, as keras_hub's samplers
    pick it for one row: greedy at a temperature of 0; else drawn from
    softmax(logits / temperature) (RandomSampler), cut to the top_k (0: no
    cut; TopKSampler) and then to the top_p (TopPSampler) most likely.

    logits (batch, vocab); temperature, top_p (batch,) floats; top_k (batch,)
    ints; seed_states (batch, 2) uint32: each row's draw key, the state a
    keras SeedGenerator(seed) holds at that token ([seed, tokens drawn]), so
    a row draws what `lm.generate` with that sampler draws for it alone.
    `draws`, `cuts` (static): whether any row draws (a temperature above 0),
    and whether any cuts; what none needs is left out (the sort of the
    vocab above all).
    """
    logits = logits.astype("float32")
    greedy = jnp.argmax(logits, axis=-1).astype("int32")
    if not draws:
        return greedy
    probabilities = jax.nn.softmax(logits / jnp.where(temperature > 0, temperature, 1)[:, None], axis=-1)
    sampled = _draw(seed_states, jnp.log(probabilities))
    if cuts:
        vocab = logits.shape[-1]
        ranked, order = jax.lax.top_k(probabilities, vocab)
        within_k = jnp.arange(vocab)[None, :] < jnp.where(top_k > 0, top_k, vocab)[:, None]
        # TopPSampler's rule: the first token, then each whose predecessors'
        # sum is at most top_p; a top_p of 1 (TopKSampler) keeps all.
        cumulative = jnp.cumsum(jnp.where(within_k, ranked, 0), axis=-1)
        before = jnp.pad(cumulative[:, :-1], ((0, 0), (1, 0)))
        within_p = (before <= top_p[:, None]) | (jnp.arange(vocab)[None, :] == 0) | (top_p[:, None] >= 1)
        chosen = _draw(seed_states, jnp.log(jnp.where(within_k & within_p, ranked, 0)))
        cut = jnp.take_along_axis(order, chosen[:, None], axis=-1)[:, 0]
        sampled = jnp.where((top_k > 0) | (top_p < 1), cut, sampled)
    return jnp.where(temperature > 0, sampled, greedy).astype("int32")


def _draw(seed_states, log_probabilities):
    """keras.random.categorical(row, 1) for each row alone, with its key."""
    one_row = lambda key, row: jax.random.categorical(key, row[None, :, None], shape=(1, 1), axis=1)[0, 0]
    return jax.vmap(one_row)(seed_states, log_probabilities)
