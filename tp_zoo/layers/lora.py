"""LoRA adapters of the linear layers, as Keras' Dense has them.

kernel + (lora_alpha / rank) * A @ B: A takes the kernel's input dims and B
its output dims, so the split follows the kernel: a column-parallel
kernel's B is split with its outputs (A whole on every device), a
row-parallel kernel's A with its inputs (B whole); each device's A @ B is
its own kernel block. A fused kernel has one (A, B) per adapted part, of
the shapes a separate layer's adapters would have.
"""

import jax
import jax.numpy as jnp

from tp_zoo.layers.base import inputs_last
from tp_zoo.layers.precision import product_precision
from tp_zoo.layers.storage import to_kernel_order


class LoRA:
    """LoRA for `ParallelLinear` (a mixin): the adapters enter the layer's
    `LocalWeights` as `lora`, one (A, B) per adapted part."""

    lora_enabled = False
    lora_parts = ()  # the parts of a fused kernel that have adapters
    _lora_names = ()  # adapter variable names, in the order made: A, B per part

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros", parts=None):
        """Freezes the kernel (and bias) and adds a trainable low-rank update
        kernel + (lora_alpha / rank) * A @ B, as Keras' Dense does.

        The adapters are float32 whatever the layer's dtype (as PEFT makes
        them): a bfloat16 adapter could not hold the small steps training
        takes. The layer computes x @ kernel + scale * (x @ A) @ B, the
        adapters cast to the compute dtype, so an update far below the
        kernel's rounding step still changes the output. A fused kernel has
        one (A, B) per part named in `parts` (all parts by default).
        """
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"{self.name}: LoRA rank must be a positive integer, got {rank!r}.")
        if not self.built:
            raise ValueError(f"{self.name}: cannot enable LoRA on a layer that isn't built yet.")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: LoRA is already enabled.")
        self.lora_parts = self._lora_targets(parts)
        self._tracker.unlock()
        names = []
        for part in self.lora_parts or (None,):
            names += self._add_adapters(part, rank, a_initializer, b_initializer)
        self._lora_names = tuple(names)
        self._tracker.lock()
        self.kernel.trainable = False
        if self.use_bias:
            self.bias.trainable = False
        self.lora_rank = rank
        self.lora_alpha = rank if lora_alpha is None else lora_alpha
        self.lora_enabled = True

    def _lora_targets(self, parts):
        """The `Part`s of a fused kernel named in `parts` (all by default); ()
        for a layer of one projection."""
        fused = self.parts_of(self.kernel_shape_built)
        if fused is None:
            if parts is not None:
                raise ValueError(f"{self.name}: LoRA parts are for fused kernels; this layer has one projection.")
            return ()
        names = [p.layer for p in fused.parts]
        parts = names if parts is None else list(parts)
        unknown = [p for p in parts if p not in names]
        if unknown or not parts:
            raise ValueError(f"{self.name}: LoRA parts {parts} must be some of {names}.")
        return tuple(p for p in fused.parts if p.layer in parts)

    def _add_adapters(self, part, rank, a_initializer, b_initializer):
        """Makes the (A, B) of `part` (None: the whole kernel); their names."""
        n_in = len(self.in_trailing)
        shape, layout = self.kernel_shape_built, self.kernel_layout
        padding = self._padding(len(shape))
        if part is None:
            prefix, out = "", (shape[n_in:], padding[n_in:], layout[n_in:])
        else:
            prefix, out = f"{part.layer}_", (part.shape, part.padding, part.layout)
        out_shape, out_padding, out_layout = (tuple(entries) for entries in out)
        adapters = (
            ("lora_kernel_a", shape[:n_in] + (rank,), layout[:n_in] + (None,), a_initializer, padding[:n_in] + (None,)),
            ("lora_kernel_b", (rank,) + out_shape, (None,) + out_layout, b_initializer, (None,) + out_padding),
        )
        for name, adapter_shape, adapter_layout, initializer, adapter_padding in adapters:
            setattr(self, prefix + name, self.add_sharded_weight(
                prefix + name, adapter_shape, adapter_layout, initializer, dtype="float32", padding=adapter_padding
            ))
        return [prefix + name for name, *_ in adapters]

    def lora_variables(self):
        """(name, variable) of the LoRA adapters: A and B, per part of a fused kernel."""
        return [(name, getattr(self, name)) for name in self._lora_names]

    def _lora_weights(self):
        """The adapters as `LocalWeights.lora`: ((A, B) per adapted part), or None."""
        if not self.lora_enabled:
            return None
        adapters = [variable for _, variable in self.lora_variables()]
        return tuple(zip(adapters[::2], adapters[1::2]))

    def merge_lora(self):
        """Folds the LoRA update into the kernel and zeroes B (adapters stay,
        now inert); a quantized kernel is quantized again (new scales)."""
        merged = self.run_with_weights(self._merged_float, self.local_weights(), (), self.kernel_layout, key="merge_lora")
        for name, value in self.scheme.quantize(merged, len(self.in_trailing), self.variable_dtype).items():
            getattr(self, name).assign(value)
        for name, variable in self.lora_variables():
            if name.endswith("_b"):
                variable.assign(jnp.zeros_like(variable.value))

    def _merged_float(self, weights):
        """The local kernel in float32, in the kernel's order (a quantized
        one dequantized), LoRA update (lora_alpha / rank) A @ B added."""
        n_in = len(self.in_trailing)
        kernel = to_kernel_order(self.scheme.dequantize(weights), inputs_last(self.kernel))
        scale = self.lora_alpha / self.lora_rank
        updates = [
            scale * jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST) for a, b in weights.lora
        ]
        return kernel + self._by_part(updates, kernel.shape[:n_in], kernel.shape[n_in:])

    def _lora_term(self, lora, x, out_shape):
        """scale * (x @ A) @ B summed into the layer's local output of
        `out_shape` (trailing dims), in float32: both products in x's dtype
        (the adapters cast to it), accumulated in float32. On a row-parallel
        layer it is this device's partial sum, reduced with the kernel's."""
        n_in = len(self.in_trailing)
        scale = self.lora_alpha / self.lora_rank
        terms = []
        for a, b in lora:
            h = jnp.tensordot(x, a.astype(x.dtype), axes=n_in, precision=product_precision(x),
                              preferred_element_type=jnp.float32).astype(x.dtype)
            terms.append(scale * jnp.tensordot(h, b.astype(x.dtype), axes=1, precision=product_precision(x),
                                               preferred_element_type=jnp.float32))
        return self._by_part(terms, x.shape[: x.ndim - n_in], out_shape)

    def _by_part(self, terms, lead, out_shape):
        """One term per adapted part (each `lead` + its part's local output
        shape) as one float32 array of `lead` + `out_shape`: a single
        projection's term as it is; a fused kernel's terms each in its
        part's block along the fused axis, zeros where a part has none."""
        if not self.lora_parts:
            return terms[0]
        fused = self.parts_of(self.kernel_shape_built)
        by_part = dict(zip((p.layer for p in self.lora_parts), terms))
        blocks = []
        for part in fused.parts:
            block = tuple(lead) + tuple(out_shape[: fused.axis]) + (part.size,) + tuple(out_shape[fused.axis + 1 :])
            term = by_part.get(part.layer)
            blocks.append(jnp.zeros(block, jnp.float32) if term is None else term.reshape(block))
        return jnp.concatenate(blocks, axis=len(lead) + fused.axis)
