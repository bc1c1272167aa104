"""The compiled programs of generation: the model's two passes (a prefill of
every prompt, then one decode step per new token), sampled, in one program
for a whole call or in two for streaming (the prefill and first tokens, then
STREAM_STEPS decode steps per call).

Each is jitted once per model and sampler (keras_hub's compile() resets
them), and runs on explicit variable values as KerasHub's compiled generate
does; the sampler's seed state comes back out and is assigned. The kernels'
configurations are a static argument, as the cache length is: a program is
traced under them, and other configurations trace it anew.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import keras
import numpy as np

from tp_zoo import kernels
from tp_zoo.models import memory
from tp_zoo.models.generation.sampling import next_tokens
from tp_zoo.models.generation.sampling import row_tokens

# Decode steps per compiled call when streaming: text shows every few
# milliseconds on a GPU, and the host's turn between calls (hidden behind the
# next call anyway) comes once per 16 tokens.
STREAM_STEPS = 16


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


def paged_step(lm, groups, pages):
    """Groups of rows through the model in one pass over a paged cache
    (per-layer (keys, values) pages). A group is (token_ids (rows, width),
    starts, counts (rows,), tables (rows, table width)): each row's next
    `counts` tokens, right padded, at positions starts, starts + 1, ...,
    their keys and values written into the row's pages. Decode steps are a
    group of width 1, prompts' chunks a wider one; their tokens go through
    each product together. Returns the logits after each row's last token
    (all groups' rows, vocab), split on the vocab, and the pages."""
    backbone = lm.backbone
    embedded, paged, lasts, offset = [], [], [], 0
    for token_ids, starts, counts, tables in groups:
        rows, width = token_ids.shape
        offsets = jnp.arange(width)[None, :]
        embedded.append(backbone.embed(token_ids, starts[:, None] + offsets).reshape(1, rows * width, -1))
        paged.append((starts, offsets < counts[:, None], tables))
        lasts.append(offset + jnp.arange(rows) * width + counts - 1)
        offset += rows * width
    x = jnp.concatenate(embedded, axis=1)
    new_pages = []
    for block, layer_pages in zip(backbone.transformer_layers, pages):
        x, layer_pages = block(x, cache=layer_pages, paged=tuple(paged))
        new_pages.append(layer_pages)
    last = x[0, jnp.concatenate(lasts)][:, None]
    return lm.lm_head(backbone.finish(last))[:, 0], new_pages


# --- sampled, token by token ---------------------------------------------------------
def _is_stop(tokens, stop_token_ids):
    if not stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_token_ids, "int32"))


def _first_tokens(lm, token_ids, lengths, budgets, stop_token_ids, cache_length):
    """The prefill and each row's first new token: (first (batch,), caches,
    done (batch,))."""
    logits, caches = prefill(lm, token_ids, lengths, cache_length)
    first = next_tokens(lm.sampler, logits)
    return first, caches, _is_stop(first, stop_token_ids) | (budgets <= 1)


def _decode_steps(lm, tokens, origin, caches, step, previous, done, lengths, budgets, stop_token_ids, cache_length,
                  steps):
    """Decode steps while a row is not done, at most `steps` of them, from
    new token `step` (`previous` the tokens of step - 1). Step s writes its
    tokens into column s - origin of `tokens`, zeros for rows already done.
    Returns (tokens, caches, step, previous, done)."""
    sampler = lm.sampler

    def cond(tokens, caches, step, previous, done):
        return jnp.logical_not(jnp.all(done))

    def body(tokens, caches, step, previous, done):
        # A finished row keeps stepping with the others; its position is
        # clamped into the cache and its tokens are dropped.
        positions = jnp.minimum(lengths + step - 1, cache_length - 1)
        logits, caches = decode_step(lm, previous, positions, caches)
        token = jnp.where(done, 0, next_tokens(sampler, logits))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step - origin, axis=1)
        done = done | _is_stop(token, stop_token_ids) | (step + 1 >= budgets)
        return tokens, caches, step + 1, token, done

    loop_vars = (tokens, caches, step, previous, done)
    return sampler.run_loop(cond, body, loop_vars=loop_vars, maximum_iterations=steps, model=lm)


def _all_new_tokens(lm, token_ids, lengths, budgets, stop_token_ids, cache_length):
    """(batch, cache_length) ids: row r's new tokens in columns [0, budgets[r]),
    zeros after the row's first stop token."""
    first, caches, done = _first_tokens(lm, token_ids, lengths, budgets, stop_token_ids, cache_length)
    generated = jnp.zeros((token_ids.shape[0], cache_length), "int32").at[:, 0].set(first)
    generated, *_ = _decode_steps(lm, generated, 0, caches, jnp.asarray(1, "int32"), first, done, lengths, budgets,
                                  stop_token_ids, cache_length, steps=jnp.max(budgets) - 1)
    return generated


def _stream_start(lm, token_ids, lengths, budgets, stop_token_ids, cache_length):
    """The prefill and first tokens of a streamed call: (caches, carry, tokens
    (batch, 1)); the carry (step, previous tokens, done) goes to the next
    `_stream_steps`."""
    first, caches, done = _first_tokens(lm, token_ids, lengths, budgets, stop_token_ids, cache_length)
    return caches, (jnp.asarray(1, "int32"), first, done), first[:, None]


def _stream_steps(lm, caches, carry, lengths, budgets, stop_token_ids, cache_length):
    """Up to STREAM_STEPS more decode steps: (caches, carry, tokens
    (batch, STREAM_STEPS)), the steps' tokens in the first columns."""
    step, previous, done = carry
    tokens = jnp.zeros((previous.shape[0], STREAM_STEPS), "int32")
    tokens, caches, next_step, previous, done = _decode_steps(
        lm, tokens, step, caches, step, previous, done, lengths, budgets, stop_token_ids, cache_length,
        steps=STREAM_STEPS,
    )
    return caches, (next_step, previous, done), tokens


# --- compiled, on explicit variable values ---------------------------------------------
def _stateless(lm, state, kernel_configs, fn, *args):
    """`fn(lm, *args)` on explicit variable values (as KerasHub's compiled
    generate does) and the kernels configured by `kernel_configs`,
    returning the sampler's advanced seed state too."""
    sampler_values, trainable, non_trainable = state
    mapping = itertools.chain(
        zip(lm.sampler.variables, sampler_values),
        zip(lm.trainable_variables, trainable),
        zip(lm.non_trainable_variables, non_trainable),
    )
    with kernels.configured(kernel_configs), keras.StatelessScope(state_mapping=mapping) as scope:
        result = fn(lm, *args)
    new_values = [scope.get_current_value(v) for v in lm.sampler.variables]
    return result, [n if n is not None else v for n, v in zip(new_values, sampler_values)]


# Named arguments, which jit's static and donated arguments are named by.
def _run_whole(lm, state, token_ids, lengths, budgets, stop_token_ids, cache_length, kernel_configs):
    return _stateless(lm, state, kernel_configs, _all_new_tokens, token_ids, lengths, budgets, stop_token_ids,
                      cache_length)


def _run_stream_start(lm, state, token_ids, lengths, budgets, stop_token_ids, cache_length, kernel_configs):
    return _stateless(lm, state, kernel_configs, _stream_start, token_ids, lengths, budgets, stop_token_ids,
                      cache_length)


def _run_stream_steps(lm, state, caches, carry, lengths, budgets, stop_token_ids, cache_length, kernel_configs):
    return _stateless(lm, state, kernel_configs, _stream_steps, caches, carry, lengths, budgets, stop_token_ids,
                      cache_length)


def _sampled_paged_step(lm, groups, pages, sampling, fed, draws, cuts):
    """`paged_step` and each row's next token by its own `sampling`
    (temperature, top_k, top_p, seed states of all groups' rows: see
    `row_tokens`). `fed`: (previous, sources): the first group's rows whose
    source is >= 0 take their token id from `previous` (P,), an earlier
    step's tokens still on the device, at that index. Returns the tokens
    padded to P (so that the next step's `previous` has one shape) and the
    pages."""
    previous, sources = fed
    (token_ids, *rest), *others = groups
    from_previous = previous[jnp.maximum(sources, 0)][:, None]
    token_ids = jnp.where(sources[:, None] >= 0, from_previous, token_ids)
    logits, pages = paged_step(lm, [(token_ids, *rest), *others], pages)
    tokens = row_tokens(logits, *sampling, draws=draws, cuts=cuts)
    return jnp.pad(tokens, (0, previous.shape[0] - tokens.shape[0])), pages


def _run_paged_step(lm, state, groups, pages, sampling, fed, draws, cuts, kernel_configs):
    return _stateless(lm, state, kernel_configs, _sampled_paged_step, groups, pages, sampling, fed, draws, cuts)


# name -> (function, jit options). Streamed steps take the caches donated, so
# they are updated in place from call to call, as inside one program; so do a
# serving engine's steps (tp_zoo.serving) its pages.
_GENERATE_STATICS = ("stop_token_ids", "cache_length", "kernel_configs")
_PROGRAMS = {
    "whole": (_run_whole, {"static_argnames": _GENERATE_STATICS}),
    "stream start": (_run_stream_start, {"static_argnames": _GENERATE_STATICS}),
    "stream steps": (_run_stream_steps, {"static_argnames": _GENERATE_STATICS, "donate_argnames": ("caches",)}),
    "paged step": (_run_paged_step, {"static_argnames": ("draws", "cuts", "kernel_configs"), "donate_argnames": ("pages",)}),
}


def program(lm, name="whole"):
    """A jitted generation program; keras_hub's compile() resets them all (a new sampler)."""
    if lm.generate_function is None:
        lm.generate_function = {}
    if name not in lm.generate_function:
        function, options = _PROGRAMS[name]
        lm.generate_function[name] = jax.jit(functools.partial(function, lm), **options)
    return lm.generate_function[name]


def variable_values(lm):
    """The state a program takes: the sampler's, trainable and non-trainable variables' values."""
    return (
        [v.value for v in lm.sampler.variables],
        [v.value for v in lm.trainable_variables],
        [v.value for v in lm.non_trainable_variables],
    )


def keep_sampler_state(lm, sampler_values):
    """Assigns the seed state a program returned, so the next call draws on."""
    for variable, value in zip(lm.sampler.variables, sampler_values):
        variable.assign(value)


def within_memory(lm, request, call):
    """`call()` after checking the request fits the devices' free memory (and
    the same error if XLA runs out)."""
    shape = (request.batch, request.prompt_width, request.cache_length)
    needed = memory.generation_bytes(lm, *shape)
    free = memory.free_device_bytes(memory.model_devices(lm))
    if free is not None and needed > free:
        raise memory.generation_memory_error(*shape, needed, free)
    try:
        return jax.block_until_ready(call())
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise memory.generation_memory_error(*shape, needed, free) from error


def generated_ids(lm, request):
    """The whole program: (batch, cache_length) ids, the sampler's state kept."""
    ids, sampler_values = within_memory(lm, request, lambda: program(lm)(
        variable_values(lm), request.token_ids, request.lengths, request.budgets,
        stop_token_ids=request.stop_token_ids, cache_length=request.cache_length,
        kernel_configs=request.kernel_configs,
    ))
    keep_sampler_state(lm, sampler_values)
    return np.asarray(ids)
