"""Generation streamed: new ids as each compiled call of STREAM_STEPS decode
steps makes them, and the text they add, piece by piece."""

import numpy as np

from tp_zoo.models.generation import programs
from tp_zoo.models.generation.planning import plan_request
from tp_zoo.models.generation.sampling import check_sampler


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
    check_sampler(lm.sampler)
    return stream_rows(lm, plan_request(lm, inputs, max_length, max_new_tokens, stop_token_ids, chat_template))


def stream_rows(lm, request):
    """`stream_ids`' generator: per compiled call, each row's new ids."""
    lengths, budgets = request.lengths, request.budgets
    options = {"stop_token_ids": request.stop_token_ids, "cache_length": request.cache_length,
               "kernel_configs": request.kernel_configs}
    state = programs.variable_values(lm)
    (caches, carry, tokens), sampler_values = programs.within_memory(
        lm, request, lambda: programs.program(lm, "stream start")(state, request.token_ids, lengths, budgets, **options)
    )
    raw = [np.zeros(0, "int32") for _ in range(request.batch)]  # each row's tokens of every step so far
    step = 0  # the step of the tokens' first column
    while True:
        state = (sampler_values, *state[1:])
        following = programs.program(lm, "stream steps")(state, caches, carry, lengths, budgets, **options)
        tokens, next_step, done = np.asarray(tokens), int(carry[0]), np.asarray(carry[2])
        programs.keep_sampler_state(lm, sampler_values)
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


class TextStream:
    """`generate(..., stream=True)`'s iterator: text pieces of the one row's
    new tokens, from `stream_rows`, as its kind of prompt shows them (a
    string's continuation, a conversation's reply). `new_ids`: the ids made
    so far, their stop token included (the text of a reply leaves it out),
    so that a caller counts tokens without encoding text again."""

    def __init__(self, lm, request):
        self.new_ids = np.zeros(0, "int32")
        self._pieces = self._text_pieces(lm, request)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._pieces)

    def _text_pieces(self, lm, request):
        prompts = request.prompts
        text = IncrementalText(lm.tokenizer.decode, prompts.text_context())
        for [new] in stream_rows(lm, request):
            self.new_ids = np.concatenate([self.new_ids, new])
            piece = text.add(prompts.shown_ids(new, request.stop_token_ids))
            if piece:
                yield piece
        piece = text.add((), final=True)
        if piece:
            yield piece


class IncrementalText:
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
