"""Rotary position embedding (the rotate-half form of Hugging Face checkpoints)."""

import math

import jax.numpy as jnp

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RotaryEmbedding:
    """Rotates each query/key head by angles position * inv_freq.

    `scaling` is a Hugging Face `rope_scaling` dict (None, "linear" or
    "llama3"); other rope types raise a ValueError.
    """

    def __init__(self, head_dim, theta=10000.0, scaling=None):
        if head_dim % 2:
            raise ValueError(f"Rotary embedding needs an even head_dim, got {head_dim}.")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.scaling = dict(scaling) if scaling else None
        self.inv_freq = self._inverse_frequencies()

    def _inverse_frequencies(self):
        exponents = jnp.arange(0, self.head_dim, 2, dtype="float32") / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.scaling is None:
            return inv_freq
        rope_type = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if rope_type == "default":
            return inv_freq
        if rope_type == "linear":
            return inv_freq / float(self.scaling["factor"])
        if rope_type == "llama3":
            return self._llama3(inv_freq)
        raise ValueError(
            f"rope_scaling of type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )

    def _llama3(self, inv_freq):
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
        # and the band between is interpolated smoothly.
        s = self.scaling
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)

    def __call__(self, x, positions):
        """x: (batch, seq, heads, head_dim); positions: (seq,) or (batch, seq)."""
        angles = jnp.asarray(positions, "float32")[..., None] * self.inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)
        if angles.ndim == 2:
            angles = angles[None]
        cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
        sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
        half = self.head_dim // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def get_config(self):
        return {"head_dim": self.head_dim, "theta": self.theta, "scaling": self.scaling}
