"""Each kernel's configuration, and the configurations in force.

A configuration is a frozen value. The kernels read the ones in force when
they are traced: the defaults, or those of the innermost `configured` block.
A compiled program that may call the kernels is keyed by the configurations
it was traced under (generation's programs take them as a static argument),
so that other configurations trace it anew instead of reusing a program
compiled for different blocks.

The defaults are what sweeps on an H200 chose (docs/performance-notes.md,
scripts/bench_decode_kernel.py and bench_int8_matmul.py).
"""

import contextlib
import contextvars
import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """The decode attention kernel's (`decode_attention`)."""

    enabled: bool = True  # False: the XLA decode step on GPUs too (to compare with)
    # Taken wherever its blocks fit, on any device and for any dtype and head
    # size, not only where it is built to be fast: with `interpret` to check
    # its logic on a CPU, without to lower it for GPUs from one.
    forced: bool = False
    interpret: bool = False  # run by Pallas' interpreter, not compiled by Triton
    block: int = 64  # keys per block: the kernel takes caches of whole blocks
    # Enough programs to fill an H100/H200 (132 SMs) about twice over.
    target_programs: int = 264
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    """The paged decode attention kernel's (`paged_attention`)."""

    enabled: bool = True  # False: the caller's XLA path on GPUs too (to compare with)
    forced: bool = False  # as DecodeAttentionConfig's: taken on any device and dtype
    interpret: bool = False  # run by Pallas' interpreter, not compiled by Triton
    # Keys per loop step: block // page_size whole pages (a power of two),
    # at least one page.
    block: int = 64
    # Enough programs to fill an H100/H200 (132 SMs) about twice over.
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 2
    # Prompts' chunks (`paged_chunk_attention`): query rows (tokens x the
    # group of heads) per program.
    chunk_query_rows: int = 128


@dataclasses.dataclass(frozen=True)
class Int8MatmulConfig:
    """The int8 product kernel's (`int8_matmul`)."""

    enabled: bool = True  # False: XLA's int8 product on GPUs too (to compare with)
    forced: bool = False  # as DecodeAttentionConfig's: taken on any device and dtype
    interpret: bool = False  # run by Pallas' interpreter, not compiled by Triton
    block_n: int = 64  # output channels per block
    block_k: int = 128  # reduction elements per block
    max_rows: int = 64  # more rows than this: compute-bound enough for XLA's GEMM
    # The fewest splits that give at least this many programs (one per H200
    # SM measured fastest with output-major blocks).
    target_programs: int = 132
    num_warps: int = 4
    num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class KernelConfigs:
    """Every kernel's configuration (hashable: a key of compiled programs)."""

    decode_attention: DecodeAttentionConfig = DecodeAttentionConfig()
    paged_attention: PagedAttentionConfig = PagedAttentionConfig()
    int8_matmul: Int8MatmulConfig = Int8MatmulConfig()


_IN_FORCE = contextvars.ContextVar("tp_zoo kernel configurations", default=KernelConfigs())


def active():
    """The `KernelConfigs` in force here."""
    return _IN_FORCE.get()


@contextlib.contextmanager
def configured(configs):
    """Runs the block with the kernels configured by `configs` (a
    `KernelConfigs`; a kernel it leaves out gets its defaults)."""
    token = _IN_FORCE.set(configs)
    try:
        yield configs
    finally:
        _IN_FORCE.reset(token)
