"""Continuous batching: an engine that keeps a batch decoding while requests
come and go, over a paged KV cache (`pages`).

Every iteration (`step`):
1. requests submitted or cancelled since the last one are taken in;
2. waiting sequences join the running ones, oldest first, while a row is
   free (`max_batch`) and the pool has pages for their ids;
3. prompts are fed in chunks, at most `prefill_chunk` prompt tokens an
   iteration, so that a long prompt does not stall the running decodes;
4. every other running sequence decodes one token;
5. each request's new ids go to its `on_output`; finished sequences leave,
   giving back their rows and pages.

Prefix caching: a prompt's whole pages, once written, stay in the pool
after their sequence ends (until their room is needed), and a later prompt
that begins with the same ids takes them instead of computing them again
(system prompts, a chat's earlier turns). Keys and values at a position
depend only on the ids up to it, so the ids are the same either way.

A sequence is its ids (the prompt, then the tokens it made), of which the
first `computed` have their keys and values in its pages. An iteration
feeds it the rest, or a chunk of them, and once all are in samples its next
token: a decode step is a feed of one id. When a decode needs a page and
none is free, the newest running sequence is preempted: it gives its pages
back and waits at the front of the queue to feed all its ids again, so it
is recomputed, never corrupted.

Both feeds run one compiled program (`generation.programs`' "paged step",
the model's paged pass and each row's own sampling) at a few shapes, all
compiled at `start`: decode batches of powers of two, and beside the
batch prompts' chunks in r rows of prefill_chunk / r (with the GPU
kernels, tables span every position; elsewhere they are as wide as the
rows' pages, rounded up to a power of two). Its sampling is
`lm.generate`'s, row by row: greedy ids, and seeded ones, are those of
`lm.generate` for the prompt alone, whatever else runs.
"""

import collections
import dataclasses
import itertools
import random
import threading

import jax
import numpy as np

from tp_zoo import kernels
from tp_zoo.errors import QueueFullError
from tp_zoo.errors import RequestError
from tp_zoo.layers import attention_ops
from tp_zoo.models.generation import programs
from tp_zoo.models.generation.inputs import Prompts
from tp_zoo.serving import pages as paging
from tp_zoo.serving.requests import CANCELLED
from tp_zoo.serving.requests import ERROR
from tp_zoo.serving.requests import LENGTH
from tp_zoo.serving.requests import STOP
from tp_zoo.serving.requests import Output
from tp_zoo.serving.requests import SamplingParams


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    pages_used: int
    pages_total: int  # pages sequences can hold (the padding page left out)
    page_size: int
    generated_tokens: int  # since the engine started
    preemptions: int
    prefix_cached_tokens: int  # prompt tokens taken from the prefix cache, not computed


# The id of a token sampled by a program whose result the host has not read.
UNREAD = -1
# The fewest rows a decode step runs at: it reads every weight whatever its
# rows, so padding costs little, and fewer batch sizes compile.
DECODE_MIN_ROWS = 16
# The fewest ids a prompt's chunk is fed in when several prompts share a
# step: narrower would add shapes to compile for little.
MIN_CHUNK_WIDTH = 32


class _Flight:
    """A program sent to the device: its feeds, its tokens (still there;
    feed i's at `indices[i]`), and where each row's token goes in its ids
    (None: a prompt's chunk that does not end it)."""

    def __init__(self, feeds, tokens, slots, indices):
        self.feeds, self.tokens, self.slots, self.indices = feeds, tokens, slots, indices

    def token_index(self):
        """{sequence: the index of its UNREAD token in `tokens`}."""
        return {sequence: index for (sequence, _), slot, index in zip(self.feeds, self.slots, self.indices)
                if slot is not None}


class _Sequence:
    """One request inside the engine."""

    def __init__(self, seq_id, prompt, params, on_output, seed, prefix_keys):
        self.id = seq_id
        self.ids = prompt
        self.prompt_length = len(prompt)
        self.prefix_keys = prefix_keys  # of the prompt's whole pages
        self.params = params
        self.on_output = on_output
        self.seed = seed
        self.computed = 0  # ids whose keys and values are in `pages`
        self.pages = []
        self.finished = False

    @property
    def made(self):
        return len(self.ids) - self.prompt_length

    @property
    def pending(self):
        return len(self.ids) - self.computed


class Engine:
    """Serves generation requests on `lm` with continuous batching.

    Args:
        lm: a tp_zoo causal LM (its mesh is the engine's devices).
        max_batch: sequences running at once.
        page_size: positions per page of the KV cache (a power of two).
        kv_memory, kv_pages: the pool's size, in bytes per device or in
            pages (default: most of the device memory the weights leave).
        prefill_chunk: prompt tokens fed per iteration: r prompts' chunks of
            prefill_chunk / r tokens each (r a power of two, chosen to feed
            the most; chunks at least MIN_CHUNK_WIDTH wide), padded, so
            that a step runs at one of a few shapes, each compiled at
            `start`.
        max_waiting: requests that may wait; more are refused
            (`QueueFullError`).

    `submit` requests from any thread; `start` runs the iterations in a
    thread of the engine's (or call `step` yourself).
    """

    def __init__(self, lm, max_batch=64, page_size=64, kv_memory=None, kv_pages=None, prefill_chunk=512,
                 max_waiting=1024):
        for name, value in (("max_batch", max_batch), ("page_size", page_size), ("prefill_chunk", prefill_chunk),
                            ("max_waiting", max_waiting)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a whole number of at least 1.")
        if page_size & (page_size - 1):
            raise ValueError(f"page_size={page_size}: must be a power of two.")
        if lm.data_parallel_degree > 1:
            raise ValueError(
                f"An engine runs one copy of the model; this one is split over {lm.mesh_sizes}. Load it with "
                "tp only and run an engine per copy (as tp-zoo serve --dp does).")
        self.lm = lm
        self.max_positions = lm.backbone.max_sequence_length
        self.max_batch, self.page_size = max_batch, page_size
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        self._table = paging.PageTable(paging.planned_pages(lm, page_size, max_batch, prefill_chunk, kv_memory,
                                                             kv_pages))
        self._pages = paging.empty_pages(lm, self._table.num_pages, page_size)
        self._state = programs.variable_values(lm)
        self._program = programs.program(lm, "paged step")
        self._kernel_configs = kernels.active()
        attention = lm.backbone.transformer_layers[0].attention
        self._kernel_reads_pages = attention_ops.paged_kernel_applies(attention.compute_dtype, attention.head_dim,
                                                                      self._pages[0][0])
        self._in_flight = None
        # Every program's tokens are padded to this many (its rows at most),
        # so that the next program takes them in one shape.
        self._token_slots = 2 * _power_of_two(max(DECODE_MIN_ROWS, max_batch))
        # The row counts of prompts' chunks: powers of two, each row at least
        # MIN_CHUNK_WIDTH ids wide (or one row).
        self._chunk_rows = [1]
        while (self._chunk_rows[-1] * 2 <= max_batch
               and prefill_chunk // (self._chunk_rows[-1] * 2) >= MIN_CHUNK_WIDTH):
            self._chunk_rows.append(self._chunk_rows[-1] * 2)
        self._last_tokens = self._idle_tokens = np.zeros(self._token_slots, "int32")
        self._waiting = collections.deque()
        self._running = []
        self._inbox, self._cancels = [], set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._next_id = itertools.count()
        self._seeds = random.SystemRandom()
        self._generated = self._preemptions = self._prefix_cached = 0
        self._thread = None
        self._stopping = False

    # --- from any thread ---------------------------------------------------------
    def submit(self, prompt_ids, params, on_output):
        """Queues a request: `prompt_ids` (ints), `params` (SamplingParams);
        `on_output(Output)` is called from the engine's thread each
        iteration the request gets ids, and once more (or then) with its
        finish reason. Returns the request's id (for `cancel`)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}.")
        prompt = self._checked_prompt(prompt_ids, params)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(32)
        keys = paging.prefix_keys(prompt, self.page_size)
        with self._lock:
            if len(self._waiting) + len(self._inbox) >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are waiting already; retry shortly.")
            sequence = _Sequence(next(self._next_id), prompt, params, on_output, seed, keys)
            self._inbox.append(sequence)
        self._wake.set()
        return sequence.id

    def cancel(self, seq_id):
        """Ends a request at the next iteration (its output: CANCELLED)."""
        with self._lock:
            self._cancels.add(seq_id)
        self._wake.set()

    def stats(self):
        return EngineStats(len(self._running), len(self._waiting) + len(self._inbox), self._table.used,
                           self._table.num_pages - 1, self.page_size, self._generated, self._preemptions,
                           self._prefix_cached)

    def start(self):
        """Warms up (`warm_up`), then runs the iterations in a daemon thread
        until `stop`."""
        if self._thread is None:
            self.warm_up()
            self._thread = threading.Thread(target=self._loop, name="tp_zoo engine", daemon=True)
            self._thread.start()

    def stop(self):
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self):
        """Whether the engine's thread runs its iterations."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self):
        while not self._stopping:
            self._wake.clear()
            if not self.step():
                self._wake.wait(timeout=1.0)

    def _checked_prompt(self, prompt_ids, params):
        """The prompt as ints, checked as generate() checks its prompts, and
        with room for max_tokens in the positions and the pool."""
        if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__len__"):
            raise RequestError("prompt: must be a non-empty list of token ids.", param="prompt")
        prompt = [int(t) for t in prompt_ids]
        try:
            Prompts(self.lm, [prompt])
        except ValueError as error:  # empty, or ids outside the vocab
            raise RequestError(str(error), param="prompt") from None
        positions = len(prompt) + params.max_tokens
        if positions > self.max_positions:
            raise RequestError(
                f"A prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} is beyond the model's "
                f"{self.max_positions} positions.", param="max_tokens")
        pages = self._pages_for(positions)
        if pages > self._table.num_pages - 1:
            raise RequestError(
                f"A prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} needs {pages} pages of the KV "
                f"cache, which holds {self._table.num_pages - 1}.", param="max_tokens")
        return prompt

    # --- the engine's thread -------------------------------------------------------
    def warm_up(self):
        """Compiles a step of every shape it will run at, of padding rows:
        decode steps at each batch size, and beside them prompts' chunks at
        each of their shapes (with the paged kernels, whose tables span the
        positions, that is all; elsewhere chunks' tables are as wide as
        their rows' pages, and each width compiles at its first step), so
        that no request waits for a compilation later."""
        shapes = [(rows, 1) for rows in (DECODE_MIN_ROWS, DECODE_MIN_ROWS)]
        while shapes[-1][0] < self.max_batch:
            shapes.append((shapes[-1][0] * 2, 1))
        shapes += [(shapes[-1][0], self.prefill_chunk // rows, rows) for rows in self._chunk_rows]
        for rows, width, *chunk_rows in shapes:
            # (the first step's previous tokens come from the host, the rest's
            # from a program, as every step's will: two inputs of their own)
            groups = [_padding_group(rows, 1, self._table_width(1))]
            groups += [_padding_group(chunk, width, self._table_width(1)) for chunk in chunk_rows]
            total = sum(len(group[0]) for group in groups)
            self._last_tokens, self._pages = self._launch(tuple(groups), _padding_sampling(total),
                                                          np.full(rows, -1, "int32"))
        # Tokens of the device's kind that no failed program made (see _recover).
        self._idle_tokens = jax.block_until_ready(self._last_tokens)

    def step(self):
        """One iteration (see the module's docstring); whether it did anything.

        Its program is sent before the previous iteration's tokens are read:
        rows whose last token is still on the device are fed it there, so the
        device does not wait on the host. What those tokens end (a stop token)
        is seen an iteration later: such a row decodes once more, and that
        token is dropped."""
        self._take_inbox()
        self._admit()
        prefills, decodes = self._feeds()
        flight, self._in_flight = self._in_flight, None
        if prefills or decodes:
            self._in_flight = self._dispatch(decodes, prefills, flight)
        self._read(flight)
        return bool(flight or prefills or decodes)

    def _take_inbox(self):
        with self._lock:
            arrived, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        self._waiting.extend(arrived)
        if cancels:
            for sequence in [s for s in itertools.chain(self._waiting, self._running) if s.id in cancels]:
                self._finish(sequence, (), CANCELLED)

    def _admit(self):
        while self._waiting and len(self._running) < self.max_batch:
            sequence = self._waiting[0]
            # The prompt's cached whole pages; its last id is always fed (its
            # logits are needed), into a page of the sequence's own.
            shared = self._table.match(sequence.prefix_keys[: (len(sequence.ids) - 1) // self.page_size])
            pages = self._table.take(self._pages_for(len(sequence.ids)) - len(shared))
            if pages is None:
                self._table.give_back(shared)
                return
            self._waiting.popleft()
            sequence.pages = shared + pages
            sequence.computed = len(shared) * self.page_size
            self._prefix_cached += sequence.computed
            self._running.append(sequence)

    def _pages_for(self, positions):
        return -(-positions // self.page_size)

    def _feeds(self):
        """(prefill feeds, decode feeds): (sequence, ids to feed) pairs, the
        decodes' pages grown first (preempting the newest where none is
        free). A sequence whose unread token is its last waits for it."""
        decoding = [s for s in self._running if s.pending == 1 and s.made < s.params.max_tokens]
        for sequence in decoding:
            # (a preempted sequence has given its pages back: no more to grow)
            while sequence.pages and len(sequence.pages) < self._pages_for(len(sequence.ids)):
                page = self._table.take(1)
                if page is None:
                    self._preempt(max(self._running, key=lambda s: s.id))
                else:
                    sequence.pages += page
        # The first r prompts with ids to feed, each fed up to prefill_chunk / r
        # of them, r (of _chunk_rows) feeding the most, the fewest rows among
        # equals.
        pending = [s for s in self._running if s.pending > 1]
        prefills = max(([(s, min(s.pending, self.prefill_chunk // rows)) for s in pending[:rows]]
                        for rows in self._chunk_rows), key=lambda feeds: sum(count for _, count in feeds))
        return prefills, [(s, 1) for s in decoding if s.pages]

    def _group_shapes(self, decodes, prefills):
        """(feeds, rows, width) of a step's groups. Beside prompts' chunks the
        decode group is there, padded to the engine's batch even when empty,
        and the chunks' group is r rows of prefill_chunk / r: a step with
        chunks has one of len(_chunk_rows) shapes."""
        rows = max(DECODE_MIN_ROWS, _power_of_two(self.max_batch if prefills else len(decodes)))
        shapes = [(decodes, rows, 1)]
        if prefills:
            rows = _power_of_two(len(prefills))
            shapes.append((prefills, rows, self.prefill_chunk // rows))
        return shapes

    def _preempt(self, sequence):
        self._running.remove(sequence)
        self._table.give_back(sequence.pages)
        sequence.pages, sequence.computed = [], 0
        self._waiting.appendleft(sequence)
        self._preemptions += 1

    def _table_width(self, pages):
        # With the paged kernels, tables span the model's positions (they
        # read only each row's own pages), so one shape serves all.
        if self._kernel_reads_pages:
            pages = self._pages_for(self.max_positions)
        return _power_of_two(pages)

    def _dispatch(self, decodes, prefills, previous):
        """Sends one program: the decodes (an UNREAD last id fed from the
        `previous` flight's tokens on the device) and the prompts' chunks,
        as two groups of one pass; counts the ids fed; each row that ends
        its ids gets an UNREAD token. Returns the `_Flight`, or None if the
        program failed (its rows fail alone)."""
        groups, rows_before, indices = [], 0, []
        for feeds, rows, width in self._group_shapes(decodes, prefills):
            table_width = self._table_width(max((len(s.pages) for s, _ in feeds), default=1))
            groups.append(self._group(feeds, rows, width, table_width))
            indices += range(rows_before, rows_before + len(feeds))
            rows_before += rows
        sampling = tuple(np.concatenate(parts) for parts in zip(*(group.pop() for group in groups)))
        sources = np.full(len(groups[0][0]), -1, "int32")
        if decodes and previous is not None:
            unread = previous.token_index()
            for row, (sequence, _) in enumerate(decodes):
                if sequence.ids[-1] == UNREAD:
                    sources[row] = unread[sequence]
        feeds = decodes + prefills
        try:
            tokens, self._pages = self._launch(tuple(tuple(group) for group in groups), sampling, sources,
                                               any(s.params.sorts for s, _ in feeds))
        except Exception as error:  # noqa: BLE001 -- the rows fail alone; the engine goes on
            self._recover(feeds, error)
            return None
        self._last_tokens = tokens
        slots = []
        for sequence, count in feeds:
            # The prompt's pages this feed fills are its prefix's from now on
            # (later programs, which may read them, run after this one).
            full = range(sequence.computed // self.page_size,
                         min(sequence.computed + count, sequence.prompt_length) // self.page_size)
            for index in full:
                self._table.remember(sequence.pages[index], sequence.prefix_keys[index])
            sequence.computed += count
            ends = sequence.computed == len(sequence.ids)
            if ends:
                sequence.ids.append(UNREAD)
            slots.append(len(sequence.ids) - 1 if ends else None)
        return _Flight(feeds, tokens, slots, indices)

    def _group(self, feeds, rows, width, table_width):
        """[token ids, starts, counts, tables, sampling] of `feeds` padded to
        `rows` (padding rows: one greedy token into page 0)."""
        token_ids, starts, counts, tables = _padding_group(rows, width, table_width)
        temperature, top_k, top_p, seed_states = sampling = _padding_sampling(rows)
        for row, (sequence, count) in enumerate(feeds):
            token_ids[row, :count] = sequence.ids[sequence.computed: sequence.computed + count]
            starts[row], counts[row] = sequence.computed, count
            tables[row, : len(sequence.pages)] = sequence.pages
            params = sequence.params
            temperature[row], top_k[row], top_p[row] = params.temperature, params.top_k, params.top_p
            seed_states[row] = sequence.seed, sequence.made
        return [token_ids, starts, counts, tables, sampling]

    def _launch(self, groups, sampling, sources, cuts=False):
        """Runs the program: (tokens, pages). `sources`: the first group's
        rows fed the last program's tokens (see `programs`' paged step)."""
        (tokens, pages), _ = self._program(
            self._state, groups, self._pages, sampling, (self._last_tokens, sources),
            draws=bool(sampling[0].any()), cuts=cuts, kernel_configs=self._kernel_configs,
        )
        return tokens, pages

    def _read(self, flight):
        """Waits for a flight's tokens and hands them out."""
        if flight is None:
            return
        try:
            tokens = np.asarray(flight.tokens)
        except Exception as error:  # noqa: BLE001 -- as in _dispatch
            self._recover(flight.feeds, error)
            return
        for (sequence, _), slot, token in zip(flight.feeds, flight.slots, tokens[flight.indices]):
            if slot is not None and not sequence.finished:
                sequence.ids[slot] = int(token)
                self._take_token(sequence, int(token), made=slot + 1 - sequence.prompt_length)

    def _take_token(self, sequence, token, made):
        self._generated += 1
        if token in sequence.params.stop_token_ids:
            self._finish(sequence, (token,), STOP)
        elif made >= sequence.params.max_tokens:
            self._finish(sequence, (token,), LENGTH)
        else:
            self._deliver(sequence, Output((token,)))

    def _finish(self, sequence, new_ids, reason, error=None):
        sequence.finished = True
        if sequence in self._running:
            self._running.remove(sequence)
            self._table.give_back(sequence.pages)
            sequence.pages = []
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        self._deliver(sequence, Output(tuple(new_ids), reason, error))

    def _deliver(self, sequence, output):
        try:
            sequence.on_output(output)
        except Exception:  # noqa: BLE001 -- a caller's callback failing ends its request alone
            if output.finish_reason is None:
                self._finish(sequence, (), ERROR, "on_output raised")

    def _recover(self, feeds, error):
        """After a program failed: its rows end with the error; the pool
        (donated to the failed call) is made anew, so every other running
        sequence feeds its ids again; a program sent after the failed one
        (fed its pool) is dropped, its tokens never read."""
        message = f"{type(error).__name__}: {error}"
        for sequence, _ in feeds:
            if not sequence.finished:
                self._finish(sequence, (), ERROR, message)
        dropped, self._in_flight = self._in_flight, None
        for sequence in dropped.token_index() if dropped is not None else ():
            if sequence.ids[-1] == UNREAD:
                sequence.ids.pop()
        self._last_tokens = self._idle_tokens  # the failed program's would fail the next
        for sequence in sorted(self._running, key=lambda s: s.id, reverse=True):
            self._preempt(sequence)
        self._table.forget()
        self._pages = paging.empty_pages(self.lm, self._table.num_pages, self.page_size)


def _power_of_two(n):
    return 1 << (n - 1).bit_length()


def _padding_group(rows, width, table_width):
    """A group of `rows` padding rows (one token each into page 0)."""
    return (np.zeros((rows, width), "int32"), np.zeros(rows, "int32"), np.ones(rows, "int32"),
            np.zeros((rows, table_width), "int32"))


def _padding_sampling(rows):
    """(temperature, top_k, top_p, seed states) of rows that are greedy."""
    return (np.zeros(rows, "float32"), np.zeros(rows, "int32"), np.ones(rows, "float32"),
            np.zeros((rows, 2), "uint32"))
