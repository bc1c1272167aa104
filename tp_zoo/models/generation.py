"""Text generation for `DecoderCausalLM`: one prefill, then one step per token.

A call is one compiled program per (batch, prompt bucket, cache bucket):

1. Prefill: every prompt, right padded, runs through the backbone once from
   position 0, writing its keys and values into per-layer caches of
   (batch, kv heads, length, head_dim), split over the devices by kv heads.
   Attention there is flash-style (cuDNN on GPUs, blockwise elsewhere), and
   the LM head sees only each row's last token, so memory grows linearly
   with the prompt.
2. Decode: each row carries its own position (its prompt length, then +1
   per step), so rows of different lengths step together from their own
   ends: a batch costs one step per new token of its longest budget,
   whatever the spread of its prompt lengths. Each step writes the row's
   new key/value in place and reads the row's cache once (`decode_step` in
   `attention_ops`).

Sampling is the compiled sampler's (`lm.compile(sampler=...)`): any keras_hub
sampler that decides token by token (greedy, top-k, top-p, random).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np

from tp_zoo.errors import DeviceMemoryError
from tp_zoo.layers.decode_kernel import BLOCK

DEFAULT_NEW_TOKENS = 64


# --- the model's two passes ----------------------------------------------------
def prefill(lm, token_ids, lengths, cache_length):
    """Runs right-padded prompts (batch, width) through the model from
    position 0. Returns the logits after each row's last prompt token
    (batch, vocab), split on the vocab, and the per-layer (keys, values)
    caches of `cache_length` positions."""
    backbone = lm.backbone
    batch, width = token_ids.shape
    padding_mask = jnp.arange(width)[None, :] < lengths[:, None]
    x = backbone.embed(token_ids)
    caches = []
    for block in backbone.transformer_layers:
        empty = block.attention.empty_cache(batch, cache_length)
        x, cache = block(x, padding_mask=padding_mask, cache=empty)
        caches.append(cache)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    return lm.lm_head(backbone.finish(last))[:, 0], caches


def decode_step(lm, tokens, positions, caches):
    """One new token per row (batch,) at its position (batch,): returns the
    next logits (batch, vocab), split on the vocab, and the updated caches."""
    backbone = lm.backbone
    x = backbone.embed(tokens[:, None], positions[:, None])
    new_caches = []
    for block, cache in zip(backbone.transformer_layers, caches):
        x, cache = block(x, cache=cache, positions=positions)
        new_caches.append(cache)
    return lm.lm_head(backbone.finish(x))[:, 0], new_caches


# --- the compiled program --------------------------------------------------------
def _sample(sampler, logits):
    return sampler.get_next_token(sampler.compute_probabilities(logits)).astype("int32")


def _is_stop(tokens, stop_token_ids):
    if not stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_token_ids, "int32"))


def _generate_ids(lm, token_ids, lengths, budgets, stop_token_ids, cache_length):
    """(batch, cache_length) ids: row r's new tokens in columns [0, budgets[r]),
    zeros after the row's first stop token."""
    sampler = lm.sampler
    batch = token_ids.shape[0]
    logits, caches = prefill(lm, token_ids, lengths, cache_length)
    first = _sample(sampler, logits)
    generated = jnp.zeros((batch, cache_length), "int32").at[:, 0].set(first)
    done = _is_stop(first, stop_token_ids) | (budgets <= 1)

    def cond(generated, caches, step, previous, done):
        return jnp.logical_not(jnp.all(done))

    def body(generated, caches, step, previous, done):
        # A finished row keeps stepping with the others; its position is
        # clamped into the cache and its tokens are dropped.
        positions = jnp.minimum(lengths + step - 1, cache_length - 1)
        logits, caches = decode_step(lm, previous, positions, caches)
        token = jnp.where(done, 0, _sample(sampler, logits))
        generated = jax.lax.dynamic_update_slice_in_dim(generated, token[:, None], step, axis=1)
        done = done | _is_stop(token, stop_token_ids) | (step + 1 >= budgets)
        return generated, caches, step + 1, token, done

    loop_vars = (generated, caches, jnp.asarray(1, "int32"), first, done)
    generated, *_ = sampler.run_loop(
        cond, body, loop_vars=loop_vars, maximum_iterations=jnp.max(budgets) - 1, model=lm
    )
    return generated


def _run(lm, state, token_ids, lengths, budgets, stop_token_ids, cache_length):
    """`_generate_ids` on explicit variable values (as KerasHub's compiled
    generate does), returning the sampler's advanced seed state too."""
    sampler_values, trainable, non_trainable = state
    mapping = itertools.chain(
        zip(lm.sampler.variables, sampler_values),
        zip(lm.trainable_variables, trainable),
        zip(lm.non_trainable_variables, non_trainable),
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        generated = _generate_ids(lm, token_ids, lengths, budgets, stop_token_ids, cache_length)
    new_values = [scope.get_current_value(v) for v in lm.sampler.variables]
    return generated, [n if n is not None else v for n, v in zip(new_values, sampler_values)]


def _program(lm):
    """The jitted generation program; keras_hub's compile() resets it (a new sampler)."""
    if lm.generate_function is None:
        lm.generate_function = jax.jit(
            functools.partial(_run, lm), static_argnames=("stop_token_ids", "cache_length")
        )
    return lm.generate_function


# --- the public call ---------------------------------------------------------------
def generate(lm, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", strip_prompt=False):
    """Generates from prompts, sharded, in one compiled program.

    Args:
        inputs: a string or a list of strings (needs the checkpoint's
            tokenizer), or a {"token_ids", "padding_mask"} batch of
            right-padded ids.
        max_length: total length (prompt + generated) of every row; each row
            generates up to max_length - its prompt length. Defaults to the
            width of an id batch.
        max_new_tokens: instead of max_length, the tokens each row may add
            (default for strings: 64).
        stop_token_ids: "auto" (the checkpoint's EOS), None, or ids.
        strip_prompt: return only the generated part.

    Returns strings for string inputs, else {"token_ids", "padding_mask"}.
    """
    _check_sampler(lm.sampler)
    prompts, as_text, single = _prompts(lm, inputs)
    lengths = np.array([len(p) for p in prompts], "int32")
    if max_length is None and max_new_tokens is None:
        if as_text:
            max_new_tokens = DEFAULT_NEW_TOKENS
        else:
            max_length = np.shape(inputs["token_ids"])[1]
    budgets = _budgets(lengths, max_length, max_new_tokens, lm.backbone.max_sequence_length)
    width = int((lengths + budgets).max())
    cache_length = _bucket(width)
    prompt_width = min(_bucket(int(lengths.max())), cache_length)
    token_ids = np.zeros((len(prompts), prompt_width), "int32")
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
    if stop_token_ids == "auto":
        stop_token_ids = _checkpoint_stop_ids(lm)
    stop_token_ids = tuple(int(t) for t in stop_token_ids) if stop_token_ids is not None else None

    needed = _bytes_needed(lm, len(prompts), prompt_width, cache_length)
    free = _free_device_bytes(lm)
    if free is not None and needed > free:
        raise _memory_error(len(prompts), prompt_width, cache_length, needed, free)
    state = (
        [v.value for v in lm.sampler.variables],
        [v.value for v in lm.trainable_variables],
        [v.value for v in lm.non_trainable_variables],
    )
    try:
        generated, sampler_values = _program(lm)(
            state, token_ids, lengths, budgets, stop_token_ids=stop_token_ids, cache_length=cache_length
        )
        generated = np.asarray(generated)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise _memory_error(len(prompts), prompt_width, cache_length, needed, free) from error
    for variable, value in zip(lm.sampler.variables, sampler_values):
        variable.assign(value)

    rows = []
    for r, prompt in enumerate(prompts):
        new = generated[r, : budgets[r]]
        stops = np.flatnonzero(np.isin(new, stop_token_ids or ()))
        if stops.size:
            new = new[: stops[0] + 1]
        rows.append(new if strip_prompt else np.concatenate([prompt, new]).astype("int32"))
    if as_text:
        texts = [lm.tokenizer.decode(row) for row in rows]
        return texts[0] if single else texts
    ids = np.zeros((len(rows), width), "int32")
    mask = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = True
    return {"token_ids": ids, "padding_mask": mask}


def _bucket(n):
    """`n` rounded up to one of 8 sizes per octave (and to whole kernel
    blocks), so that few shapes compile and at most 1/8 is padding."""
    step = max(BLOCK, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _check_sampler(sampler):
    if type(sampler).__call__ is not keras_hub.samplers.Sampler.__call__:
        raise ValueError(
            f"{type(sampler).__name__} searches over whole sequences, which tp_zoo's generate() does "
            "not do; use a sampler that picks token by token: 'greedy', 'top_k', 'top_p' or 'random'."
        )


def _budgets(lengths, max_length, max_new_tokens, limit):
    """New tokens each row may generate."""
    longest = int(lengths.max())
    if max_length is not None and max_new_tokens is not None:
        raise ValueError("Pass max_length or max_new_tokens, not both.")
    if max_new_tokens is not None:
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"A prompt of {longest} tokens + max_new_tokens={max_new_tokens} is beyond the "
                f"model's {limit} positions."
            )
        return np.full(lengths.shape, max_new_tokens, "int32")
    if max_length > limit:
        raise ValueError(f"max_length={max_length} is beyond the model's {limit} positions.")
    if longest >= max_length:
        raise ValueError(
            f"A prompt of {longest} tokens leaves no room to generate within max_length={max_length}."
        )
    return (max_length - lengths).astype("int32")


def _prompts(lm, inputs):
    """(list of id lists, given as text?, a single string?) with checks."""
    if isinstance(inputs, str):
        inputs, single = [inputs], True
    else:
        single = False
    if isinstance(inputs, dict):
        if set(inputs) != {"token_ids", "padding_mask"}:
            raise ValueError(
                f"An id batch needs exactly the keys 'token_ids' and 'padding_mask', got {sorted(inputs)}."
            )
        ids = np.asarray(inputs["token_ids"])
        mask = np.asarray(inputs["padding_mask"]).astype(bool)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"token_ids and padding_mask must both be (batch, length); got {ids.shape} and {mask.shape}."
            )
        prompts = []
        for row, row_mask in zip(ids, mask):
            length = int(row_mask.sum())
            if not row_mask[:length].all():
                raise ValueError("padding_mask must mark each prompt's tokens first (right padding).")
            prompts.append([int(t) for t in row[:length]])
        _check_ids(lm, prompts)
        return prompts, False, False
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(
            "generate() takes a string, a non-empty list of strings, or a "
            f"{{'token_ids', 'padding_mask'}} batch; got {type(inputs).__name__}."
        )
    if not all(isinstance(x, str) for x in inputs):
        raise ValueError(
            "generate() got a list mixing strings and other values; pass either strings, "
            "or ids as a {'token_ids', 'padding_mask'} batch."
        )
    if lm.tokenizer is None:
        raise ValueError(
            "This checkpoint has no tokenizer files, so generate() needs ids: "
            "pass a {'token_ids', 'padding_mask'} batch."
        )
    prompts = [lm.tokenizer.encode(text) for text in inputs]
    _check_ids(lm, prompts)
    return prompts, True, single


def _check_ids(lm, prompts):
    vocab = lm.backbone.vocab_size
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"Prompt {row} is empty: give at least one token.")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Prompt {row} has token ids outside the vocab [0, {vocab}): {bad[:5]}.")


def _checkpoint_stop_ids(lm):
    if lm.tokenizer is not None and lm.tokenizer.eos_ids:
        return lm.tokenizer.eos_ids
    eos = (lm.hf_config or {}).get("eos_token_id")
    if eos is None:
        return None
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


# --- device memory ------------------------------------------------------------------
def _bytes_needed(lm, batch, prompt_width, cache_length):
    """Estimated bytes per device beyond the weights: the KV cache plus the
    prefill's largest live activations (a layer's input, q/k/v and MLP
    intermediates, float32 attention tiles)."""
    backbone = lm.backbone
    attention = backbone.transformer_layers[0].attention
    tp = attention.tp
    itemsize = np.dtype(attention.compute_dtype).itemsize
    cache = 2 * backbone.num_layers * batch * attention.local_kv_heads * cache_length * attention.head_dim * itemsize
    heads = (attention.padded_heads + 2 * attention.padded_kv_heads) * backbone.head_dim // tp
    per_token = 4 * backbone.hidden_dim + heads + 3 * backbone.transformer_layers[0].mlp.padded_intermediate_dim // tp
    tile = 512 * attention.padded_heads // tp * 4
    activations = batch * prompt_width * (per_token * itemsize + tile)
    return cache + activations + 4 * batch * backbone.vocab_size


def _free_device_bytes(lm):
    """Free memory of the fullest device the model uses (None where the
    platform does not report it, as on CPU)."""
    mesh_info = lm.backbone.transformer_layers[0].attention.mesh_info
    devices = mesh_info.mesh.devices.flat if mesh_info is not None else jax.local_devices()[:1]
    free = []
    for device in devices:
        if device.process_index != jax.process_index():
            continue
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) if free else None


def _memory_error(batch, prompt_width, cache_length, needed, free):
    have = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
    return DeviceMemoryError(
        f"Generating {batch} rows (prompts padded to {prompt_width} tokens, cache of {cache_length} "
        f"positions) needs about {needed / 2**30:.2f} GiB per device beyond the weights; "
        f"{have} is free. Use fewer rows, shorter prompts or max_length, or a larger tp."
    )
