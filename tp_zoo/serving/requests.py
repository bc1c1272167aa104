"""What one generation request asks for (`SamplingParams`, checked as
OpenAI's API states its fields) and what comes back of it (`Output`)."""

import dataclasses
import numbers

from tp_zoo.errors import RequestError
from tp_zoo.models.generation import sampling

# The finish reasons a request ends with: OpenAI's "stop" (a stop token or
# string) and "length" (max_tokens, or the model's positions), and ours for a
# request the client dropped or the engine failed.
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when it ends. A temperature of 0
    is greedy; otherwise softmax(logits / temperature), cut to the top_k
    most likely tokens (0: no cut), then to the smallest set whose
    probability reaches top_p, as keras_hub's samplers do. With a seed, the
    draws are the same whatever else runs: those of `lm.generate` with the
    matching keras_hub sampler seeded alike, one prompt at a time."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: tuple = ()
    seed: int = None

    def __post_init__(self):
        sampling.check_temperature(self.temperature)
        sampling.check_top_p(self.top_p)
        _check(_is_whole(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "a whole number, 0 for no cut")
        _check(_is_whole(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "a whole number of at least 1")
        _check(isinstance(self.stop_token_ids, tuple) and all(_is_whole(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "a tuple of token ids")
        _check(self.seed is None or (_is_whole(self.seed) and 0 <= self.seed < 2**32), "seed", self.seed,
               "a whole number in [0, 2**32)")

    @property
    def sorts(self):
        """Whether choosing a token needs the probabilities sorted (a cut)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)


@dataclasses.dataclass(frozen=True)
class Output:
    """What a request got in one engine iteration: its new token ids (a stop
    token included), and once it ends, why (`finish_reason`: STOP, LENGTH,
    CANCELLED or ERROR, with `error` the message)."""

    new_ids: tuple
    finish_reason: str = None
    error: str = None


def _is_whole(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(ok, param, value, what):
    if not ok:
        raise RequestError(f"{param}={value!r}: must be {what}.", param=param)
