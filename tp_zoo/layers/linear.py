"""Megatron's column- and row-parallel linear layers.

Column-parallel: the kernel is split on its output dim (and so is the bias);
each device computes its slice of the output with no communication.
Row-parallel: the kernel is split on its input dim; each device multiplies
its slice of the input, the partial products are all-reduced, and the
replicated bias is added once, after the all-reduce.

The per-head variants are the same two rules on EinsumDense-style kernels of
shape (hidden, heads, head_dim) and (heads, head_dim, hidden), split on the
heads axis, as attention needs them.

A layer's split dim may be padded up to a multiple of tp (`padding`, an
`AxisPadding`, given by the attention or MLP that owns the layer): the
padded kernel columns (and bias entries) or rows are zero, and a
row-parallel layer also zeroes its padded inputs, so the padding adds
nothing and its slices get zero gradients.
"""

import jax
import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers import quantize as q8
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import check_divisible
from tp_zoo.layers.base import real_mask
from tp_zoo.layers.base import round_up

M = parallel.MODEL
B = parallel.BATCH

# Why a layer cannot pad its split dim alone: the layer on the other side of
# the split activation must pad the same way (the owning block's choice).
_PAD_UPSTREAM = (
    " (its input arrives split by the layer before it, so any padding is that layer's to add, "
    "as ParallelAttention and ParallelMLP do)"
)
_PAD_WITH_CONSUMER = (
    " (its output stays split for the layer after it, so padding is chosen for both, "
    "as ParallelAttention and ParallelMLP do; a gathered output pads itself)"
)


def _activation_layout(rank, trailing):
    """(BATCH, None, ..., *trailing) for an activation of `rank` dims."""
    return (B,) + (None,) * (rank - 1 - len(trailing)) + tuple(trailing)


class _ParallelLinear(ShardedLayer):
    """x -> einsum(x, kernel) (+ bias), with one of Megatron's split rules.

    Subclasses set the equation, the kernel and bias shapes and layouts, the
    layouts of the input's and output's trailing dims, and whether the
    partial products are summed over devices (row-parallel).
    """

    equation = None
    reduces = False
    split_axis = None  # the kernel dim split over the devices (and padded, if any)

    def __init__(
        self,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        quantized=None,
        padding=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # None, or the `AxisPadding` of the split dim (a list from get_config).
        self.padding = None if padding is None else AxisPadding(*padding)
        if quantized is not None:
            q8.check_mode(quantized, self.name)
        # None, or the quantization mode ("int8"): the kernel is then int8
        # with a float32 per-output-channel `kernel_scale` (see quantize()).
        self.quantized = quantized
        q8.use_own_quantize(self)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    # Subclasses: shapes and layouts.
    def kernel_shape(self, in_dim):
        raise NotImplementedError

    kernel_layout = bias_layout = in_trailing = out_trailing = ()
    bias_shape = ()

    def build(self, input_shape):
        in_dim = input_shape[-1] if len(self.in_trailing) == 1 else input_shape[-2:]
        shape = self.kernel_shape(in_dim)
        if self.padding is not None and shape[self.split_axis] != self.padding.size:
            raise ValueError(
                f"{self.name}: the split dim of kernel shape {shape} should be {self.padding.size} (its padding)."
            )
        if self.quantized:
            # Made quantized (a saved quantized model, or from_preset(quantize=)):
            # the values come from the file. The scale is made first, as
            # quantize() makes it: variable order is what saved files follow.
            self.kernel_scale = self._add_quantized_weight(
                "kernel_scale", "ones", self.scale_shape(shape), self.scale_layout, "float32"
            )
            self.kernel = self._add_quantized_weight("kernel", "zeros", shape, self.kernel_layout, "int8")
        else:
            self.kernel = self.add_sharded_weight(
                "kernel", shape, self.kernel_layout, self.kernel_initializer, padding=self._padding(len(shape))
            )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_sharded_weight(
                "bias", self.bias_shape, self.bias_layout, self.bias_initializer,
                padding=self._padding(len(shape))[len(self.in_trailing) :],
            )

    def _padding(self, rank):
        """Per kernel dim: the split dim's `AxisPadding`, None elsewhere."""
        return tuple(self.padding if d == self.split_axis else None for d in range(rank))

    # --- weight-only int8 -----------------------------------------------------
    @property
    def scale_layout(self):
        """The scale's layout: that of the kernel's output dims."""
        return tuple(self.kernel_layout[len(self.in_trailing) :])

    def scale_shape(self, kernel_shape):
        return tuple(kernel_shape[len(self.in_trailing) :])

    def _add_quantized_weight(self, name, initializer, shape, layout, dtype):
        """A non-trainable variable of `dtype` (int8 values or their float32
        scale), split as `layout` says; `initializer` may be a global array.
        A checkpoint source (from_preset(quantize="int8")) fills it instead."""
        padding = self._padding(len(self.kernel_layout))[len(self.kernel_layout) - len(shape) :]
        return self.add_sharded_weight(name, shape, layout, initializer, trainable=False, dtype=dtype, padding=padding)

    def quantize(self, mode=None, type_check=True, config=None):
        """Replaces the float kernel by int8 values of the same shape and
        layout and a float32 per-output-channel `kernel_scale` (max |w| over
        the whole reduction dims / 127, the same at every tp). Checks
        everything before changing anything."""
        q8.check_mode(mode, self.name)
        if config is not None:
            raise ValueError(f"{self.name}: a quantization config is not supported; call quantize({mode!r}).")
        if not self.built:
            raise ValueError(f"{self.name}: cannot quantize a layer that isn't built yet.")
        if self.quantized:
            raise ValueError(f"{self.name}: the layer is already quantized ({self.quantized}).")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: cannot quantize a layer with LoRA enabled; merge or quantize first.")
        values, scale = q8.quantize_int8(self.kernel.value, len(self.in_trailing))
        shape = tuple(self.kernel.shape)
        kernel_scale = self._add_quantized_weight(
            "kernel_scale", scale, self.scale_shape(shape), self.scale_layout, "float32"
        )
        kernel = self._add_quantized_weight("kernel", values, shape, self.kernel_layout, "int8")
        q8.install(self, kernel_scale, kernel, mode)

    # --- LoRA ---------------------------------------------------------------
    lora_enabled = False

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros"):
        """Freezes the kernel (and bias) and adds a trainable low-rank update
        kernel + (lora_alpha / rank) * A @ B, as Keras' Dense does.

        A takes the kernel's input dims and B its output dims, so the split
        follows the kernel: a column-parallel kernel's B is split with its
        outputs (A whole on every device), a row-parallel kernel's A with
        its inputs (B whole); each device's A @ B is its own kernel block.
        """
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"{self.name}: LoRA rank must be a positive integer, got {rank!r}.")
        if not self.built:
            raise ValueError(f"{self.name}: cannot enable LoRA on a layer that isn't built yet.")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: LoRA is already enabled.")
        self._tracker.unlock()
        n_in = len(self.in_trailing)
        shape, layout = tuple(self.kernel.shape), self.kernel_layout
        padding = self._padding(len(shape))
        self.lora_kernel_a = self.add_sharded_weight(
            "lora_kernel_a", shape[:n_in] + (rank,), layout[:n_in] + (None,), a_initializer,
            padding=padding[:n_in] + (None,),
        )
        self.lora_kernel_b = self.add_sharded_weight(
            "lora_kernel_b", (rank,) + shape[n_in:], (None,) + layout[n_in:], b_initializer,
            padding=(None,) + padding[n_in:],
        )
        self._tracker.lock()
        self.kernel.trainable = False
        if self.use_bias:
            self.bias.trainable = False
        self.lora_rank = rank
        self.lora_alpha = rank if lora_alpha is None else lora_alpha
        self.lora_enabled = True

    def merge_lora(self):
        """Folds the LoRA update into the kernel and zeroes B (adapters stay, now inert)."""
        weights, layouts = self.weights_and_layouts()
        if self.quantized:  # the merged kernel is quantized again (new scales)
            merged = self.run_sharded(self._merged_float, (layouts,), self.kernel_layout, weights, key="merge_q")
            values, scale = q8.quantize_int8(merged, len(self.in_trailing))
            self.kernel.assign(values)
            self.kernel_scale.assign(scale)
        else:
            merged = self.run_sharded(
                lambda w: self.effective(w)[0], (layouts,), self.kernel_layout, weights, key="merge_lora"
            )
            self.kernel.assign(merged)
        self.lora_kernel_b.assign(jnp.zeros_like(self.lora_kernel_b.value))

    # --- computation --------------------------------------------------------
    def weights_and_layouts(self):
        """The variables' current values and layouts, for enclosing layers."""
        values = [self.kernel.value]
        layouts = [self.kernel_layout]
        if self.use_bias:
            values.append(self.bias.value)
            layouts.append(self.bias_layout)
        if self.quantized:
            values.append(self.kernel_scale.value)
            layouts.append(self.scale_layout)
        if self.lora_enabled:
            values += [self.lora_kernel_a.value, self.lora_kernel_b.value]
            layouts += [self.lora_kernel_a_layout, self.lora_kernel_b_layout]
        return tuple(values), tuple(layouts)

    @property
    def lora_kernel_a_layout(self):
        return self.kernel_layout[: len(self.in_trailing)] + (None,)

    @property
    def lora_kernel_b_layout(self):
        return (None,) + self.kernel_layout[len(self.in_trailing) :]

    def _lora_update(self, weights):
        a, b = weights[-2:]
        return jnp.tensordot(a, b, axes=1) * (self.lora_alpha / self.lora_rank)

    def _merged_float(self, weights):
        """A quantized kernel dequantized in float32, LoRA update added."""
        kernel = q8.dequantize(weights[0], weights[2 if self.use_bias else 1])
        return kernel + self._lora_update(weights).astype(jnp.float32) if self.lora_enabled else kernel

    def effective(self, weights):
        """(kernel, bias or None) from local weights, the LoRA update folded
        in. A quantized kernel is a `QuantizedKernel` (int8 values, scale),
        or, under LoRA, dequantized with the update added (compute dtype)."""
        kernel = weights[0]
        bias = weights[1] if self.use_bias else None
        if self.quantized:
            if not self.lora_enabled:
                return q8.QuantizedKernel(kernel, weights[2 if self.use_bias else 1]), bias
            return self._merged_float(weights).astype(self.compute_dtype), bias
        if self.lora_enabled:
            kernel = kernel + self._lora_update(weights).astype(kernel.dtype)
        return kernel, bias

    def apply(self, kernel, bias, x):
        """The layer's math on local shards (inside a sharded region)."""
        if isinstance(kernel, q8.QuantizedKernel):
            return self._apply_quantized(kernel, bias, x)
        if bias is None and not (self.reduces and self.tp > 1):
            y = jnp.einsum(self.equation, x, kernel)
        else:
            # Summed over devices and biased in float32, then rounded once (as
            # torch's addmm): rounding the product before its bias, or each
            # device's partial sum, costs visible bf16 accuracy. Only here: a
            # float32 product is much slower for batch-1 decode on GPUs.
            y = jnp.einsum(self.equation, x, kernel, preferred_element_type=jnp.float32)
            if self.reduces:
                y = parallel.all_reduce(y)
            if bias is not None:
                y = y + bias.astype(jnp.float32)
            y = y.astype(x.dtype)
        return self.activation(y) if self.activation is not None else y

    def _apply_quantized(self, kernel, bias, x):
        """int8 weights, x.dtype activations: the int8 values (exact in bf16)
        multiplied in x's dtype, accumulated in float32, summed over devices,
        then scaled per output channel and biased in float32, rounded once."""
        y = q8.int8_product(x, kernel.values, len(self.in_trailing))
        if self.reduces:
            y = parallel.all_reduce(y)
        y = y * kernel.scale.astype(jnp.float32)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        y = y.astype(x.dtype)
        return self.activation(y) if self.activation is not None else y

    def local_apply(self, weights, x):
        """What one device computes on its shards (inside a sharded region)."""
        if self.reduces and self.padding is not None and self.padding.is_padded:
            x = x * self._local_input_mask(x)
        return self.apply(*self.effective(weights), x)

    def _local_input_mask(self, x):
        """0/1 over this device's slice of the (padded) split input dims:
        zero at the padding, so that the padded rows of the kernel (and of
        LoRA's A) get no gradient from whatever the padding carried."""
        mask = real_mask(self._padding(len(self.in_trailing)))
        local = x.shape[x.ndim - len(self.in_trailing)]
        mask = jax.lax.dynamic_slice_in_dim(mask, parallel.model_index() * local, local, axis=0)
        return mask.astype(x.dtype)

    def call(self, x):
        weights, layouts = self.weights_and_layouts()
        return self.run_sharded(
            self.local_apply,
            (layouts, _activation_layout(x.ndim, self.in_trailing)),
            _activation_layout(x.ndim - len(self.in_trailing) + len(self.out_trailing), self.out_trailing),
            weights,
            x,
        )

    def compute_output_shape(self, input_shape):
        lead = tuple(input_shape[: len(input_shape) - len(self.in_trailing)])
        return lead + tuple(self.output_trailing_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        if self.quantized:
            config["quantized"] = self.quantized
        if self.padding is not None:
            config["padding"] = list(self.padding)
        return config


@keras.saving.register_keras_serializable(package="tp_zoo")
class ColumnParallelDense(_ParallelLinear):
    """Dense layer with its kernel and bias split on the output dim.

    The output stays split on its last dim (what a following
    `RowParallelDense` wants) unless `gather_output=True`. An activation
    here must be elementwise, since each device sees only its columns.
    """

    equation = "...i,io->...o"
    kernel_layout = (None, M)
    bias_layout = (M,)
    in_trailing = (None,)
    split_axis = 1

    def __init__(self, units, activation=None, use_bias=True, gather_output=False, **kwargs):
        super().__init__(activation=activation, use_bias=use_bias, **kwargs)
        self.units = units
        self.gather_output = gather_output
        self.out_trailing = (None,) if gather_output else (M,)
        if gather_output:
            if self.padding is not None:
                raise ValueError(f"{self.name}: a gathered output pads itself (to a multiple of tp); give no padding.")
            # Gathered, then cut back to `units`: nothing outside sees this padding.
            self.padding = AxisPadding.trailing(units, round_up(units, self.tp))
        padded_units = units if self.padding is None else self.padding.size
        check_divisible(self.name, "units", padded_units, self.tp, _PAD_WITH_CONSUMER)
        self.bias_shape = (padded_units,)
        self.output_trailing_shape = (units if gather_output else padded_units,)

    def kernel_shape(self, in_dim):
        return (in_dim, self.bias_shape[0])

    def local_apply(self, weights, x):
        y = super().local_apply(weights, x)
        return parallel.all_gather(y, axis=-1)[..., : self.units] if self.gather_output else y

    def get_config(self):
        config = {**super().get_config(), "units": self.units, "gather_output": self.gather_output}
        if self.gather_output:  # tp's own padding, made again at the tp it is rebuilt under
            del config["padding"]
        return config


@keras.saving.register_keras_serializable(package="tp_zoo")
class RowParallelDense(_ParallelLinear):
    """Dense layer with its kernel split on the input dim.

    Takes an input split on its last dim (a column-parallel output; a
    replicated input is sliced locally), all-reduces the partial products
    and adds the replicated bias once, after the all-reduce.
    """

    equation = "...i,io->...o"
    reduces = True
    kernel_layout = (M, None)
    bias_layout = (None,)
    in_trailing = (M,)
    out_trailing = (None,)
    split_axis = 0

    def __init__(self, units, activation=None, use_bias=True, **kwargs):
        super().__init__(activation=activation, use_bias=use_bias, **kwargs)
        self.units = units
        self.bias_shape = (units,)
        self.output_trailing_shape = (units,)

    def kernel_shape(self, in_dim):
        check_divisible(self.name, "input dim", in_dim, self.tp, _PAD_UPSTREAM)
        return (in_dim, self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="tp_zoo")
class HeadSplitDense(_ParallelLinear):
    """hidden -> (heads, head_dim), column-parallel over heads.

    `replicated=True` keeps every head on every device, for key/value heads
    fewer than the tensor-parallel devices (each device then picks the
    heads its query heads need).
    """

    equation = "...d,dnh->...nh"
    in_trailing = (None,)
    split_axis = 1

    def __init__(self, num_heads, head_dim, use_bias=True, replicated=False, **kwargs):
        super().__init__(use_bias=use_bias, **kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.replicated = replicated
        heads = None if replicated else M
        padded_heads = num_heads if self.padding is None else self.padding.size
        if not replicated:
            check_divisible(self.name, "heads", padded_heads, self.tp)
        self.kernel_layout = (None, heads, None)
        self.bias_layout = (heads, None)
        self.out_trailing = (heads, None)
        self.bias_shape = (padded_heads, head_dim)
        self.output_trailing_shape = (padded_heads, head_dim)

    def kernel_shape(self, in_dim):
        return (in_dim,) + self.bias_shape

    @staticmethod
    def take_head(kernel, bias, head):
        """The one head `head` of a local kernel (float or `QuantizedKernel`)
        and bias (or None): what a device keeps of replicated kv heads."""
        cut = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, head, 1, axis=axis)
        if isinstance(kernel, q8.QuantizedKernel):
            kernel = q8.QuantizedKernel(cut(kernel.values, 1), cut(kernel.scale, 0))
        else:
            kernel = cut(kernel, 1)
        return kernel, (None if bias is None else cut(bias, 0))

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "replicated": self.replicated,
        }


@keras.saving.register_keras_serializable(package="tp_zoo")
class HeadMergeDense(_ParallelLinear):
    """(heads, head_dim) -> hidden, row-parallel over heads."""

    equation = "...nh,nhd->...d"
    reduces = True
    kernel_layout = (M, None, None)
    bias_layout = (None,)
    in_trailing = (M, None)
    out_trailing = (None,)
    split_axis = 0

    def __init__(self, units, use_bias=True, **kwargs):
        super().__init__(use_bias=use_bias, **kwargs)
        self.units = units
        self.bias_shape = (units,)
        self.output_trailing_shape = (units,)

    def kernel_shape(self, in_dim):
        heads, head_dim = in_dim
        check_divisible(self.name, "heads", heads, self.tp, _PAD_UPSTREAM)
        return (heads, head_dim, self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}
