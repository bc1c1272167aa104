"""A generate() call planned: each row's budget of new tokens, the stop
tokens, and the shapes its compiled programs take.

Prompt widths and cache lengths are rounded up to buckets (8 sizes per
octave), so that few shapes compile, and cache lengths to whole blocks of the
decode kernel (of its configuration in force), the only caches it takes.
"""

import dataclasses
import math

import numpy as np

from tp_zoo import kernels
from tp_zoo.kernels import decode_attention
from tp_zoo.models.generation.inputs import Prompts
from tp_zoo.models.generation.inputs import parse_prompts


@dataclasses.dataclass
class Request:
    """A generate() call, planned: the prompts and the shapes it runs at."""

    prompts: Prompts
    budgets: np.ndarray  # new tokens each row may generate
    stop_token_ids: tuple  # or None
    width: int  # longest prompt + its budget
    cache_length: int
    prompt_width: int
    # The kernels' configurations in force when planned: the cache length
    # follows its decode block, and the programs are traced under it.
    kernel_configs: kernels.KernelConfigs

    @property
    def batch(self):
        return len(self.prompts.ids)

    @property
    def lengths(self):
        return self.prompts.lengths

    @property
    def token_ids(self):
        """The prompts right padded to (batch, prompt_width)."""
        token_ids = np.zeros((self.batch, self.prompt_width), "int32")
        for row, prompt in enumerate(self.prompts.ids):
            token_ids[row, : len(prompt)] = prompt
        return token_ids

    def new_ids(self, row, new):
        """Row `row`'s new tokens of `new` (its columns from the first): at
        most its budget, up to and including its first stop token."""
        new = new[: self.budgets[row]]
        stops = np.flatnonzero(np.isin(new, self.stop_token_ids or ()))
        return new[: stops[0] + 1] if stops.size else new


def plan_request(lm, inputs, max_length, max_new_tokens, stop_token_ids, chat_template):
    """The `Request` of generate()'s arguments (see `generate`), checked."""
    prompts = parse_prompts(lm, inputs, chat_template)
    limit = lm.backbone.max_sequence_length
    if max_length is None and max_new_tokens is None:
        max_length, max_new_tokens = prompts.default_lengths(limit)
    budgets = _budgets(prompts, max_length, max_new_tokens, limit)
    width = int((prompts.lengths + budgets).max())
    cache_length = bucket(width)
    if stop_token_ids == "auto":
        stop_token_ids = checkpoint_stop_ids(lm)
    stop_token_ids = tuple(int(t) for t in stop_token_ids) if stop_token_ids is not None else None
    return Request(prompts, budgets, stop_token_ids, width, cache_length,
                   prompt_width=min(bucket(int(prompts.lengths.max())), cache_length),
                   kernel_configs=kernels.active())


def bucket(n):
    """`n` rounded up to one of 8 sizes per octave (and to whole decode
    kernel blocks), so that few shapes compile and at most 1/8 is padding."""
    step = math.lcm(decode_attention.cache_length_multiple(), 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _budgets(prompts, max_length, max_new_tokens, limit):
    """New tokens each row may generate, within the model's `limit` positions."""
    lengths, what = prompts.lengths, prompts.noun
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


def checkpoint_stop_ids(lm):
    """The tokenizer's stop tokens (config.json's, generation_config.json's
    and tokenizer_config.json's EOS), else config.json's."""
    if lm.tokenizer is not None and lm.tokenizer.eos_ids:
        return lm.tokenizer.eos_ids
    eos = (lm.hf_config or {}).get("eos_token_id")
    if eos is None:
        return None
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
