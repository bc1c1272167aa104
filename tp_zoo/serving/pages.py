"""The paged KV cache: per layer, keys and values in fixed-size pages of a
pool on the devices (split over them by kv heads, as generate()'s cache),
and on the host the table that hands pages to sequences and keeps whole
pages of prompts for later prompts that begin alike (prefix caching).

Page 0 belongs to no sequence: padding tokens write there, and table
entries past a sequence's end point at it (never read: attention stops at
each row's position)."""

import collections
import hashlib

import numpy as np

from tp_zoo.errors import DeviceMemoryError
from tp_zoo.models import memory

# Of the memory free after the weights, the share the pages take by default;
# the rest is the steps' activations and logits.
DEFAULT_MEMORY_FRACTION = 0.85
# Positions per row of a pool sized without a memory figure (CPUs).
CPU_ROW_POSITIONS = 2048


def prefix_keys(ids, page_size):
    """A key per whole page of `ids`: a digest of every id up to that
    page's end, so equal keys mean equal prefixes (SHA-256, so that no
    prompt can be made to collide with another's and read its pages)."""
    keys, digest = [], hashlib.sha256()
    for end in range(page_size, len(ids) + 1, page_size):
        digest.update(np.asarray(ids[end - page_size: end], "<i8").tobytes())
        keys.append(digest.copy().digest())
    return keys


class PageTable:
    """The host's view of the pool. A page is free, held by sequences (a
    count of them), or cached: holding a prompt's whole page that no
    sequence holds now, kept under its prefix key for a later prompt that
    begins alike, and taken back (least recently used first) when no page
    is free."""

    def __init__(self, num_pages):
        if num_pages < 2:
            raise ValueError(f"A paged cache needs at least 2 pages (one is the padding page), got {num_pages}.")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: low ids first
        self._holders = {}  # page -> sequences holding it
        self._page_of = {}  # prefix key -> page holding it
        self._key_of = {}  # page -> its prefix key
        self._cached = collections.OrderedDict()  # cached pages no sequence holds, least recently used first

    @property
    def free(self):
        """Pages a sequence may take: free or cached."""
        return len(self._free) + len(self._cached)

    @property
    def used(self):
        """Pages sequences hold."""
        return len(self._holders)

    def take(self, count):
        """`count` pages (free ones first, then cached ones, forgotten), or
        None (and none taken) if fewer are free or cached."""
        if count > self.free:
            return None
        taken = []
        for _ in range(count):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._cached.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._holders[page] = 1
            taken.append(page)
        return taken

    def give_back(self, pages):
        """Pages a sequence no longer holds (in its order): cached if they
        hold a prefix and no other sequence holds them, else free. Its last
        pages go first, so that they are taken back before the pages their
        prefixes run through."""
        for page in reversed(pages):
            self._holders[page] -= 1
            if self._holders[page] == 0:
                del self._holders[page]
                if page in self._key_of:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    def remember(self, page, key):
        """Marks a held page as holding the prefix `key` (its contents
        written), for `match`. A key already held by another page keeps
        that one."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key], self._key_of[page] = page, key

    def match(self, keys):
        """The pages holding the longest run of `keys` from the first, now
        held by the caller too."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            if page in self._cached:
                del self._cached[page]
            self._holders[page] = self._holders.get(page, 0) + 1
            pages.append(page)
        return pages

    def forget(self):
        """Drops every prefix (the pool's contents are gone): cached pages
        become free."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._page_of.clear()
        self._key_of.clear()


def empty_pages(lm, num_pages, page_size):
    """Per layer, (keys, values) pages of zeros on the model's devices."""
    return [block.attention.empty_pages(num_pages, page_size) for block in lm.backbone.transformer_layers]


def page_bytes(lm, page_size):
    """Bytes of one page of every layer's keys and values, per device."""
    return sum(block.attention.page_bytes(page_size) for block in lm.backbone.transformer_layers)


def planned_pages(lm, page_size, max_batch, prefill_chunk, kv_memory=None, kv_pages=None):
    """How many pages the pool holds: `kv_pages`; else `kv_memory` bytes per
    device of them; else DEFAULT_MEMORY_FRACTION of the device memory free
    beyond the weights and a step's activations (and where the platform
    reports no free memory, as on CPU, every row at the model's positions
    up to CPU_ROW_POSITIONS: a step there writes its pool whole)."""
    if kv_pages is not None:
        return kv_pages
    per_page = page_bytes(lm, page_size)
    if kv_memory is None:
        free = memory.free_device_bytes(memory.model_devices(lm))
        if free is None:
            positions = min(lm.backbone.max_sequence_length, CPU_ROW_POSITIONS)
            return max_batch * -(-positions // page_size) + 1
        backbone = lm.backbone
        activations = backbone.prefill_bytes(1, prefill_chunk) + 16 * max_batch * backbone.vocab_size
        kv_memory = DEFAULT_MEMORY_FRACTION * free - activations
    pages = int(kv_memory // per_page)
    if pages < 2:
        raise DeviceMemoryError(
            f"{kv_memory / 2**30:.2f} GiB for the KV cache holds {max(pages, 0)} pages of {page_size} positions "
            f"({per_page / 2**20:.1f} MiB each per device); give it more memory (kv_memory), or use a larger tp."
        )
    return pages
