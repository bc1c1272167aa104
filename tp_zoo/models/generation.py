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

Streaming (`stream_ids`, `generate(..., stream=True)`) runs the same two
passes as two programs: the prefill and first tokens, then up to
STREAM_STEPS decode steps per call, the caches and each row's step carried
from call to call, so the decode loop stays compiled and text shows as it is
made.

Conversations are rendered with the checkpoint's chat template
(`tp_zoo.models.chat_template`) and answered up to an end-of-turn token
(the checkpoint's stop tokens).

Sampling is the compiled sampler's (`lm.compile(sampler=...)`): any keras_hub
sampler that decides token by token (greedy, top-k, top-p, random).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np

from tp_zoo.errors import DeviceMemoryError
from tp_zoo.layers.decode_kernel import BLOCK
from tp_zoo.models.chat_template import ChatTemplate
from tp_zoo.models.chat_template import check_conversation
from tp_zoo.models.memory import free_device_bytes

DEFAULT_NEW_TOKENS = 64
# A reply's default budget, within what the model's positions leave.
DEFAULT_REPLY_TOKENS = 512
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


# --- the compiled programs -------------------------------------------------------
def _sample(sampler, logits):
    return sampler.get_next_token(sampler.compute_probabilities(logits)).astype("int32")


def _is_stop(tokens, stop_token_ids):
    if not stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_token_ids, "int32"))


def _first_tokens(lm, token_ids, lengths, budgets, stop_token_ids, cache_length):
    """The prefill and each row's first new token: (first (batch,), caches,
    done (batch,))."""
    logits, caches = prefill(lm, token_ids, lengths, cache_length)
    first = _sample(lm.sampler, logits)
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
        token = jnp.where(done, 0, _sample(sampler, logits))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step - origin, axis=1)
        done = done | _is_stop(token, stop_token_ids) | (step + 1 >= budgets)
        return tokens, caches, step + 1, token, done

    loop_vars = (tokens, caches, step, previous, done)
    return sampler.run_loop(cond, body, loop_vars=loop_vars, maximum_iterations=steps, model=lm)


def _generate_ids(lm, token_ids, lengths, budgets, stop_token_ids, cache_length):
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


def _stateless(lm, state, fn, *args):
    """`fn(lm, *args)` on explicit variable values (as KerasHub's compiled
    generate does), returning the sampler's advanced seed state too."""
    sampler_values, trainable, non_trainable = state
    mapping = itertools.chain(
        zip(lm.sampler.variables, sampler_values),
        zip(lm.trainable_variables, trainable),
        zip(lm.non_trainable_variables, non_trainable),
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        result = fn(lm, *args)
    new_values = [scope.get_current_value(v) for v in lm.sampler.variables]
    return result, [n if n is not None else v for n, v in zip(new_values, sampler_values)]


def _run_whole(lm, state, token_ids, lengths, budgets, stop_token_ids, cache_length):
    return _stateless(lm, state, _generate_ids, token_ids, lengths, budgets, stop_token_ids, cache_length)


def _run_stream_start(lm, state, token_ids, lengths, budgets, stop_token_ids, cache_length):
    return _stateless(lm, state, _stream_start, token_ids, lengths, budgets, stop_token_ids, cache_length)


def _run_stream_steps(lm, state, caches, carry, lengths, budgets, stop_token_ids, cache_length):
    return _stateless(lm, state, _stream_steps, caches, carry, lengths, budgets, stop_token_ids, cache_length)


# name -> (function, jit options). Streamed steps take the caches donated, so
# they are updated in place from call to call, as inside one program.
_PROGRAMS = {
    "whole": (_run_whole, {}),
    "stream start": (_run_stream_start, {}),
    "stream steps": (_run_stream_steps, {"donate_argnames": ("caches",)}),
}


def _program(lm, name="whole"):
    """A jitted generation program; keras_hub's compile() resets them all (a new sampler)."""
    if lm.generate_function is None:
        lm.generate_function = {}
    if name not in lm.generate_function:
        function, options = _PROGRAMS[name]
        lm.generate_function[name] = jax.jit(
            functools.partial(function, lm), static_argnames=("stop_token_ids", "cache_length"), **options
        )
    return lm.generate_function[name]


def _variable_values(lm):
    return (
        [v.value for v in lm.sampler.variables],
        [v.value for v in lm.trainable_variables],
        [v.value for v in lm.non_trainable_variables],
    )


# --- a request: prompts as ids, budgets and shapes ------------------------------------
@dataclasses.dataclass
class _Request:
    prompts: list  # each row's prompt ids
    kind: str  # "ids", "text" or "chat": what came in, and so what goes out
    single: bool  # one string or conversation (not a list of them)
    budgets: np.ndarray  # new tokens each row may generate
    stop_token_ids: tuple  # or None
    width: int  # longest prompt + its budget
    cache_length: int
    prompt_width: int

    @property
    def lengths(self):
        return np.array([len(p) for p in self.prompts], "int32")

    @property
    def token_ids(self):
        """The prompts right padded to (batch, prompt_width)."""
        token_ids = np.zeros((len(self.prompts), self.prompt_width), "int32")
        for row, prompt in enumerate(self.prompts):
            token_ids[row, : len(prompt)] = prompt
        return token_ids

    def new_ids(self, row, new):
        """Row `row`'s new tokens of `new` (its columns from the first): at
        most its budget, up to and including its first stop token."""
        new = new[: self.budgets[row]]
        stops = np.flatnonzero(np.isin(new, self.stop_token_ids or ()))
        return new[: stops[0] + 1] if stops.size else new

    def without_stop(self, new):
        """A reply's ids: new ids without the stop token that ends the turn."""
        return new[:-1] if new.size and new[-1] in (self.stop_token_ids or ()) else new


def _request(lm, inputs, max_length, max_new_tokens, stop_token_ids, chat_template):
    prompts, kind, single = _prompts(lm, inputs, chat_template)
    lengths = np.array([len(p) for p in prompts], "int32")
    limit = lm.backbone.max_sequence_length
    if max_length is None and max_new_tokens is None:
        if kind == "ids":
            max_length = np.shape(inputs["token_ids"])[1]
        elif kind == "chat":
            _check_room_for_reply(lengths, limit)
            max_new_tokens = min(DEFAULT_REPLY_TOKENS, limit - int(lengths.max()))
        else:
            max_new_tokens = DEFAULT_NEW_TOKENS
    what = "conversation" if kind == "chat" else "prompt"
    budgets = _budgets(lengths, max_length, max_new_tokens, limit, what)
    width = int((lengths + budgets).max())
    cache_length = _bucket(width)
    if stop_token_ids == "auto":
        stop_token_ids = _checkpoint_stop_ids(lm)
    stop_token_ids = tuple(int(t) for t in stop_token_ids) if stop_token_ids is not None else None
    return _Request(prompts, kind, single, budgets, stop_token_ids, width, cache_length,
                    prompt_width=min(_bucket(int(lengths.max())), cache_length))


# --- the public calls ---------------------------------------------------------------
def generate(lm, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", strip_prompt=False,
             chat_template=None, stream=False):
    """Generates from prompts or conversations, sharded, in one compiled
    program (streamed: a program per STREAM_STEPS tokens, `stream_ids`).

    Args:
        inputs: a string or a list of strings (needs the checkpoint's
            tokenizer); a conversation, a list of {"role", "content"} dicts
            (roles "system", "user", "assistant", "tool"), or a list of
            conversations; or a {"token_ids", "padding_mask"} batch of
            right-padded ids.
        max_length: total length (prompt + generated) of every row; each row
            generates up to max_length - its prompt length. Defaults to the
            width of an id batch.
        max_new_tokens: instead of max_length, the tokens each row may add
            (default for strings: 64; for conversations: up to 512, as many
            as the model's positions leave).
        stop_token_ids: "auto" (the checkpoint's end tokens: config.json's,
            generation_config.json's and the tokenizer's EOS), None, or ids.
        strip_prompt: return only the generated part (of strings or ids).
        chat_template: for conversations, a Jinja chat template to use in
            place of the checkpoint's (`tp_zoo.models.chat_template`).
        stream: return a generator of text pieces as they are decoded (one
            string or conversation only); see `stream_ids`.

    A conversation is rendered with the chat template and its generation
    prompt, and its reply is returned: the text the model generates up to
    its end-of-turn token (a stop token), without it.

    Returns strings for string inputs, replies for conversations, else
    {"token_ids", "padding_mask"}. With `stream=True`, a generator of
    strings whose concatenation is that result less the prompt: for a string
    prompt, the text that follows the prompt's own decoded text (so a space
    the tokenizer folds into the first new token shows); for a conversation,
    the reply.
    """
    _check_sampler(lm.sampler)
    request = _request(lm, inputs, max_length, max_new_tokens, stop_token_ids, chat_template)
    if stream:
        if request.kind == "ids" or not request.single:
            raise ValueError("stream=True takes one prompt: a string or one conversation (stream_ids streams ids).")
        return _stream_text(lm, request)
    generated = _run(lm, request)
    rows = [request.new_ids(r, generated[r]) for r in range(len(request.prompts))]
    if request.kind == "chat":
        replies = [lm.tokenizer.decode(request.without_stop(new)) for new in rows]
        return replies[0] if request.single else replies
    if not strip_prompt:
        rows = [np.concatenate([prompt, new]).astype("int32") for prompt, new in zip(request.prompts, rows)]
    if request.kind == "text":
        texts = [lm.tokenizer.decode(row) for row in rows]
        return texts[0] if request.single else texts
    ids = np.zeros((len(rows), request.width), "int32")
    mask = np.zeros((len(rows), request.width), bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = True
    return {"token_ids": ids, "padding_mask": mask}


def stream_ids(lm, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", chat_template=None):
    """`generate`'s new tokens as they come: a generator of lists (one array
    of ids per row, empty where a row has none) whose concatenations are the
    rows `generate(..., strip_prompt=True)` returns (each up to and
    including its stop token). Arguments as for `generate`.

    The decode loop stays compiled: after the prefill (and the first
    tokens), each call runs up to STREAM_STEPS decode steps on the device,
    with the caches, positions and stop flags carried from call to call
    (the caches donated, so written in place). The next call is dispatched
    before the host reads the tokens of the last one, so the device does
    not wait on the host; once every row is done it runs no step. Greedy
    ids are those of `generate` exactly, and a seeded sampler draws the
    same ones (its seed state advances once per token either way).
    """
    _check_sampler(lm.sampler)
    return _stream_rows(lm, _request(lm, inputs, max_length, max_new_tokens, stop_token_ids, chat_template))


def _run(lm, request):
    """The whole program: (batch, cache_length) ids, sampler state updated."""
    generated, sampler_values = _checking_memory(lm, request, lambda: _program(lm)(
        _variable_values(lm), request.token_ids, request.lengths, request.budgets,
        stop_token_ids=request.stop_token_ids, cache_length=request.cache_length,
    ))
    for variable, value in zip(lm.sampler.variables, sampler_values):
        variable.assign(value)
    return np.asarray(generated)


def _stream_rows(lm, request):
    """`stream_ids`' generator: per compiled call, each row's new ids."""
    lengths, budgets = request.lengths, request.budgets
    options = {"stop_token_ids": request.stop_token_ids, "cache_length": request.cache_length}
    state = _variable_values(lm)
    (caches, carry, tokens), sampler_values = _checking_memory(lm, request, lambda: _program(lm, "stream start")(
        state, request.token_ids, lengths, budgets, **options
    ))
    raw = [np.zeros(0, "int32") for _ in request.prompts]  # each row's tokens of every step so far
    step = 0  # the step of the tokens' first column
    while True:
        state = (sampler_values, *state[1:])
        following = _program(lm, "stream steps")(state, caches, carry, lengths, budgets, **options)
        tokens, next_step, done = np.asarray(tokens), int(carry[0]), np.asarray(carry[2])
        for variable, value in zip(lm.sampler.variables, sampler_values):
            variable.assign(value)
        rows = []
        for r in range(len(raw)):
            shown = len(request.new_ids(r, raw[r]))
            raw[r] = np.concatenate([raw[r], tokens[r, : next_step - step]])
            rows.append(request.new_ids(r, raw[r])[shown:])
        yield rows
        if done.all():
            return
        (caches, carry, tokens), sampler_values = following
        step = next_step


def _stream_text(lm, request):
    """Text pieces of one row's new tokens, from `_stream_rows`."""
    # A string prompt's continuation is decoded after the prompt's ids; a
    # reply alone, as generate() returns it.
    text = _IncrementalText(lm.tokenizer.decode, request.prompts[0] if request.kind == "text" else ())
    for [new] in _stream_rows(lm, request):
        piece = text.add(request.without_stop(new) if request.kind == "chat" else new)
        if piece:
            yield piece
    piece = text.add((), final=True)
    if piece:
        yield piece


class _IncrementalText:
    """The text of growing ids, as pieces: each one what decoding all the ids
    so far adds to the text shown, held back while that text ends in an
    incomplete character (U+FFFD: a multi-byte character split between
    tokens, or a merge still to come) or would change text already shown
    (which tokenizers' decoders do not do past the first token)."""

    def __init__(self, decode, context=()):
        self.decode = decode
        self.ids = [int(i) for i in context]
        self.shown = decode(self.ids)

    def add(self, ids, final=False):
        self.ids += [int(i) for i in ids]
        text = self.decode(self.ids)
        if not text.startswith(self.shown) or (text.endswith("\ufffd") and not final):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


def _checking_memory(lm, request, call):
    """`call()` after checking the request fits the devices' free memory (and
    the same error if XLA runs out)."""
    batch = len(request.prompts)
    needed = _bytes_needed(lm, batch, request.prompt_width, request.cache_length)
    free = free_device_bytes(lm)
    if free is not None and needed > free:
        raise _memory_error(batch, request.prompt_width, request.cache_length, needed, free)
    try:
        return jax.block_until_ready(call())
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise _memory_error(batch, request.prompt_width, request.cache_length, needed, free) from error


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


def _budgets(lengths, max_length, max_new_tokens, limit, what="prompt"):
    """New tokens each row may generate (`what`: each row's name in errors)."""
    longest = int(lengths.max())
    if max_length is not None and max_new_tokens is not None:
        raise ValueError("Pass max_length or max_new_tokens, not both.")
    if max_new_tokens is not None:
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"A {what} of {longest} tokens + max_new_tokens={max_new_tokens} is beyond the "
                f"model's {limit} positions."
            )
        return np.full(lengths.shape, max_new_tokens, "int32")
    if max_length > limit:
        raise ValueError(f"max_length={max_length} is beyond the model's {limit} positions.")
    if longest >= max_length:
        raise ValueError(
            f"A {what} of {longest} tokens leaves no room to generate within max_length={max_length}."
        )
    return (max_length - lengths).astype("int32")


def _prompts(lm, inputs, chat_template):
    """(list of id lists, "ids" / "text" / "chat", a single string or conversation?) with checks."""
    if chat_template is not None and not _conversations(inputs):
        raise ValueError("chat_template= applies to conversations: lists of {'role', 'content'} dicts.")
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
        return prompts, "ids", False
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(
            "generate() takes a string, a non-empty list of strings, a conversation (a list of {'role', "
            f"'content'}} dicts), a list of conversations, or a {{'token_ids', 'padding_mask'}} batch; got "
            f"{type(inputs).__name__}."
        )
    conversations = _conversations(inputs)
    if conversations is not None:
        template = ChatTemplate(lm.tokenizer, chat_template)
        prompts = [template.encode(c, add_generation_prompt=True) for c in conversations]
        _check_ids(lm, prompts)
        return prompts, "chat", isinstance(inputs[0], dict)
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
    return prompts, "text", single


def _conversations(inputs):
    """The checked conversations `inputs` holds (one conversation, a list of
    message dicts, or a list of them), or None if it holds none."""
    if not isinstance(inputs, (list, tuple)) or not inputs:
        return None
    if isinstance(inputs[0], dict):
        return [_one_conversation(inputs)]
    if isinstance(inputs[0], (list, tuple)):
        return [_one_conversation(c, index) for index, c in enumerate(inputs)]
    return None


def _one_conversation(messages, index=None):
    if isinstance(messages, (list, tuple)) and not messages:
        raise ValueError(f"Conversation {index or 0} is empty: give at least one message.")
    return check_conversation(messages, index)


def _check_room_for_reply(lengths, limit):
    longest = int(lengths.argmax())
    if lengths[longest] >= limit:
        raise ValueError(
            f"Conversation {longest} is {lengths[longest]} tokens long as the chat template renders it, which "
            f"leaves no room for a reply within the model's {limit} positions; shorten it."
        )


def _check_ids(lm, prompts):
    vocab = lm.backbone.vocab_size
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"Prompt {row} is empty: give at least one token.")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Prompt {row} has token ids outside the vocab [0, {vocab}): {bad[:5]}.")


def _checkpoint_stop_ids(lm):
    """The tokenizer's stop tokens (config.json's, generation_config.json's
    and tokenizer_config.json's EOS), else config.json's."""
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


def _memory_error(batch, prompt_width, cache_length, needed, free):
    have = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
    return DeviceMemoryError(
        f"Generating {batch} rows (prompts padded to {prompt_width} tokens, cache of {cache_length} "
        f"positions) needs about {needed / 2**30:.2f} GiB per device beyond the weights; "
        f"{have} is free. Use fewer rows, shorter prompts or max_length, or a larger tp."
    )
