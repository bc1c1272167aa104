"""The paged KV cache: per layer, keys and values in fixed-size pages of a
pool on the devices (split over them by kv heads, as generate()'s cache),
and on the host the free list that hands pages to sequences.

Page 0 belongs to no sequence: padding tokens write there, and table
entries past a sequence's end point at it (never read: attention stops at
each row's position)."""

from tp_zoo.errors import DeviceMemoryError
from tp_zoo.models import memory

# Of the memory free after the weights, the share the pages take by default;
# the rest is the steps' activations and logits.
DEFAULT_MEMORY_FRACTION = 0.85
# Positions per row of a pool sized without a memory figure (CPUs).
CPU_ROW_POSITIONS = 2048


class PageTable:
    """The host's view of the pool: which pages are free."""

    def __init__(self, num_pages):
        if num_pages < 2:
            raise ValueError(f"A paged cache needs at least 2 pages (one is the padding page), got {num_pages}.")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: low ids first

    @property
    def free(self):
        return len(self._free)

    @property
    def used(self):
        return self.num_pages - 1 - len(self._free)

    def take(self, count):
        """`count` free pages, or None (and none taken) if fewer are free."""
        if count > len(self._free):
            return None
        taken = self._free[len(self._free) - count:][::-1]
        del self._free[len(self._free) - count:]
        return taken

    def give_back(self, pages):
        self._free.extend(reversed(pages))


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
