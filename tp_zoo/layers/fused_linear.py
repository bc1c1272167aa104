"""Several column-parallel projections of one input as one kernel (vLLM's
QKVParallelLinear / MergedColumnParallelLinear): q/k/v, and an MLP's
gate/up."""

import jax
import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import check_divisible
from tp_zoo.layers.linear import PAD_WITH_CONSUMER
from tp_zoo.layers.linear import ParallelLinear
from tp_zoo.layers.quantize import LocalWeights
from tp_zoo.layers.quantize import scheme_for
from tp_zoo.layers.storage import Fused
from tp_zoo.layers.storage import Part

M = parallel.MODEL


class _FusedColumnDense(ParallelLinear):
    """Several column-parallel projections of one input as one kernel, laid
    out so that each device's shard holds its slice of every projection
    side by side: one product per device where there were several (vLLM's
    QKVParallelLinear / MergedColumnParallelLinear). Each projection is a
    `Part` of the kernel (and of the bias, int8 values and scale):
    checkpoints load it, get/set_weights and export show it, and LoRA adapts
    it as the variable of a separate layer.

    Subclasses set `out_shape` (the padded output dims), `out_layout`,
    `out_padding` (an `AxisPadding` or None per output dim), `fused_axis`
    (the output dim the parts sit along) and `parts` (layer name, size along
    that dim, and the part's own output shape, padding and layout).
    """

    in_trailing = (None,)

    def _setup(self):
        letters = "abcdefgh"[: len(self.out_shape)]
        self.equation = f"...z,z{letters}->...{letters}"
        self.kernel_layout = (None,) + tuple(self.out_layout)
        self.bias_layout = tuple(self.out_layout)
        self.out_trailing = tuple(self.out_layout)
        self.bias_shape = tuple(self.out_shape)
        self.output_trailing_shape = tuple(self.out_shape)

    def kernel_shape(self, in_dim):
        return (in_dim,) + self.bias_shape

    def _padding(self, rank):
        return (None,) * (rank - len(self.out_shape)) + tuple(self.out_padding)

    @property
    def part_names(self):
        """The projections this layer fuses, in kernel order."""
        return [name for name, *_ in self.parts]

    def parts_of(self, kernel_shape, kernel=False):
        whole = lambda n: AxisPadding.trailing(n, n)
        lead = (kernel_shape[0],) if kernel else ()
        parts = tuple(
            Part(name, size, lead + tuple(shape), tuple(map(whole, lead)) + tuple(padding),
                 (None,) * len(lead) + tuple(layout))
            for name, size, shape, padding, layout in self.parts
        )
        return Fused(len(lead) + self.fused_axis, parts)


@keras.saving.register_keras_serializable(package="tp_zoo")
class QKVParallelDense(_FusedColumnDense):
    """hidden -> queries, keys and values in one product: kernel (hidden,
    kv heads, 2 + query heads per kv head, head_dim), each kv head's key,
    value and its group of query heads side by side, split on the kv heads.

    `padding` is the query heads' `AxisPadding` (kv heads as groups, the
    query heads of each as group entries; see `ParallelAttention`): the
    kv heads are padded at their end and each group at its end, behind the
    key and value. `replicated=True` keeps the kernel whole on every device
    (kv heads fewer than tp: each device then cuts out its kv head and its
    query heads, `_own_group`). The parts are "key", "value" and "query",
    each a kernel of shape (hidden, heads, head_dim).
    """

    fused_axis = 1

    def __init__(self, head_dim, padding, use_bias=True, replicated=False, **kwargs):
        super().__init__(use_bias=use_bias, padding=padding, **kwargs)
        q = self.padding
        self.padding = None  # several dims are padded: see out_padding
        self.query_padding = q
        self.head_dim = head_dim
        self.replicated = replicated
        heads = None if replicated else M
        if not replicated:
            check_divisible(self.name, "kv heads", q.padded_groups, self.tp)
        kv_padding = AxisPadding.trailing(q.groups, q.padded_groups)
        whole = AxisPadding.trailing(head_dim, head_dim)
        self.out_shape = (q.padded_groups, 2 + q.padded_group_size, head_dim)
        self.out_layout = (heads, None, None)
        self.out_padding = (kv_padding, AxisPadding.trailing(2 + q.group_size, 2 + q.padded_group_size), None)
        kv_part = ((q.padded_groups, head_dim), (kv_padding, whole), (heads, None))
        self.parts = (
            ("key", 1) + kv_part,
            ("value", 1) + kv_part,
            ("query", q.padded_group_size, (q.size, head_dim), (q, whole), (heads, None)),
        )
        self._setup()

    def split(self, y):
        """(queries, keys, values) of a local output (..., kv heads, 2 + group, head_dim):
        (..., kv heads x group, head_dim) and (..., kv heads, head_dim) twice."""
        q = y[..., 2:, :]
        return q.reshape(q.shape[:-3] + (-1, self.head_dim)), y[..., 0, :], y[..., 1, :]

    def local_call(self, weights, x, own_heads=False):
        """As `ParallelLinear.local_call`. With `own_heads` (attention's use),
        a replicated kernel is first cut down to the kv head this device's
        queries use and those queries (the LoRA adapters folded into it
        first, dequantized, in the compute dtype); without, every device
        computes every head."""
        scheme = self.scheme
        if self.replicated and own_heads:
            if weights.lora is not None:
                merged = self._merged_float(weights).astype(self.compute_dtype)
                weights, scheme = LocalWeights(merged, weights.bias), scheme_for(None)
            weights = self._own_group(scheme, weights)
        return self._product(scheme, weights, x)

    def _own_group(self, scheme, weights):
        """Of replicated local weights: the key and value of the kv head and the
        query heads of it that this device computes."""
        devices_per_kv = self.tp // self.query_padding.padded_groups
        queries = self.query_padding.padded_group_size // devices_per_kv
        index = parallel.model_index()
        kv_head, first_query = index // devices_per_kv, (index % devices_per_kv) * queries

        def cut(a, axis):  # axis: the kv-head dim of `a`
            a = jax.lax.dynamic_slice_in_dim(a, kv_head, 1, axis=axis)
            kv = jax.lax.slice_in_dim(a, 0, 2, axis=axis + 1)
            q = jax.lax.dynamic_slice_in_dim(a, 2 + first_query, queries, axis=axis + 1)
            return jnp.concatenate([kv, q], axis=axis + 1)

        weights = scheme.cut_outputs(weights, len(self.in_trailing), 0, cut)
        return weights._replace(bias=None if weights.bias is None else cut(weights.bias, 0))

    def get_config(self):
        return {
            **super().get_config(),
            "head_dim": self.head_dim,
            "padding": list(self.query_padding),
            "replicated": self.replicated,
        }


@keras.saving.register_keras_serializable(package="tp_zoo")
class MergedColumnParallelDense(_FusedColumnDense):
    """hidden -> several projections of `units` each (an MLP's gate and up)
    in one product: kernel (hidden, len(names), units), split on the units.
    `padding` pads the units (at their end), as for `ColumnParallelDense`."""

    fused_axis = 0

    def __init__(self, units, names=("gate", "up"), use_bias=True, **kwargs):
        super().__init__(use_bias=use_bias, **kwargs)
        self.units = units
        self.names = tuple(names)
        padding = self.padding or AxisPadding.trailing(units, units)
        self.padding = None
        self.units_padding = padding
        check_divisible(self.name, "units", padding.size, self.tp, PAD_WITH_CONSUMER)
        self.out_shape = (len(self.names), padding.size)
        self.out_layout = (None, M)
        self.out_padding = (None, padding)
        self.parts = tuple((name, 1, (padding.size,), (padding,), (M,)) for name in self.names)
        self._setup()

    def split(self, y):
        """Each projection's local output (..., units) of a local output (..., parts, units)."""
        return tuple(y[..., i, :] for i in range(len(self.names)))

    def get_config(self):
        config = {**super().get_config(), "units": self.units, "names": list(self.names)}
        if self.units_padding.is_padded:
            config["padding"] = list(self.units_padding)
        return config
