"""Megatron's column- and row-parallel linear layers.

Column-parallel: the kernel is split on its output dim (and so is the bias);
each device computes its slice of the output with no communication.
Row-parallel: the kernel is split on its input dim; each device multiplies
its slice of the input, the partial products are all-reduced, and the
replicated bias is added once, after the all-reduce.

The per-head variant (HeadMergeDense) is the row rule on an EinsumDense-style
kernel of shape (heads, head_dim, hidden), split on the heads axis, as
attention's output needs it. Fused projections (q/k/v, gate/up) are in
fused_linear.py, LoRA in lora.py, kernel formats in quantize/.

A layer's split dim may be padded up to a multiple of tp (`padding`, an
`AxisPadding`, given by the attention or MLP that owns the layer): the
padded kernel columns (and bias entries) or rows are zero, and a
row-parallel layer also zeroes its padded inputs, so the padding adds
nothing and its slices get zero gradients.
"""

import jax
import keras

from tp_zoo import parallel
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import check_divisible
from tp_zoo.layers.base import full_padding
from tp_zoo.layers.base import real_mask
from tp_zoo.layers.base import round_up
from tp_zoo.layers.lora import LoRA
from tp_zoo.layers.quantize import KernelSpec
from tp_zoo.layers.quantize import LocalWeights
from tp_zoo.layers.quantize import check_mode
from tp_zoo.layers.quantize import install
from tp_zoo.layers.quantize import scheme_for
from tp_zoo.layers.quantize import use_own_quantize

M = parallel.MODEL
B = parallel.BATCH

# Why a layer cannot pad its split dim alone: the layer on the other side of
# the split activation must pad the same way (the owning block's choice).
PAD_UPSTREAM = (
    " (its input arrives split by the layer before it, so any padding is that layer's to add, "
    "as ParallelAttention and ParallelMLP do)"
)
PAD_WITH_CONSUMER = (
    " (its output stays split for the layer after it, so padding is chosen for both, "
    "as ParallelAttention and ParallelMLP do; a gathered output pads itself)"
)


def _activation_layout(rank, trailing):
    """(BATCH, None, ..., *trailing) for an activation of `rank` dims."""
    return (B,) + (None,) * (rank - 1 - len(trailing)) + tuple(trailing)


class ParallelLinear(LoRA, ShardedLayer):
    """x -> einsum(x, kernel) (+ bias), with one of Megatron's split rules.

    Subclasses set the equation, the kernel and bias shapes and layouts, the
    layouts of the input's and output's trailing dims, and whether the
    partial products are summed over devices (row-parallel). The kernel is
    stored and multiplied by the layer's quantization scheme (`scheme`).
    """

    equation = None
    reduces = False
    split_axis = None  # the kernel dim split over the devices (and padded, if any)
    kernel_scale = None  # the scheme's scale variable, where it has one

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
        self.scheme = scheme_for(quantized, self.name)
        use_own_quantize(self)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    @property
    def quantized(self):
        """None, or the quantization mode of the kernel ("int8")."""
        return self.scheme.mode

    # Subclasses: shapes and layouts.
    def kernel_shape(self, in_dim):
        raise NotImplementedError

    kernel_layout = bias_layout = in_trailing = out_trailing = ()
    bias_shape = ()

    def build(self, input_shape):
        in_dim = input_shape[-1] if len(self.in_trailing) == 1 else input_shape[-2:]
        shape = self.kernel_shape_built = tuple(self.kernel_shape(in_dim))
        if self.padding is not None and shape[self.split_axis] != self.padding.size:
            raise ValueError(
                f"{self.name}: the split dim of kernel shape {shape} should be {self.padding.size} (its padding)."
            )
        # A quantized scheme's values come from a file (a saved quantized
        # model, or from_preset(quantize=)).
        for name, variable in self.scheme.create_weights(self, self.kernel_spec()).items():
            setattr(self, name, variable)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_sharded_weight(
                "bias", self.bias_shape, self.bias_layout, self.bias_initializer,
                padding=self._padding(len(shape))[len(self.in_trailing) :], parts=self.parts_of(shape),
            )

    def kernel_spec(self):
        """The float kernel's `KernelSpec`, for the scheme."""
        shape = self.kernel_shape_built
        return KernelSpec(
            shape, tuple(self.kernel_layout), full_padding(self._padding(len(shape)), shape), len(self.in_trailing),
            self.parts_of(shape, kernel=True), self.parts_of(shape), self.kernel_initializer,
        )

    def _padding(self, rank):
        """Per kernel dim: the split dim's `AxisPadding`, None elsewhere."""
        return tuple(self.padding if d == self.split_axis else None for d in range(rank))

    def parts_of(self, kernel_shape, kernel=False):
        """The `Fused` parts of the kernel (`kernel=True`) or of a variable of
        the output dims (bias, int8 scale); None: a layer of one projection."""
        return None

    def quantize(self, mode=None, type_check=True, config=None):
        """Replaces the float kernel by the variables of `mode`'s scheme (int8:
        values stored output-major, shape (*out_dims, *in_dims), split as the
        kernel's dims were, and a float32 per-output-channel `kernel_scale`,
        max |w| over the whole reduction dims / 127, the same at every tp).
        Checks everything before changing anything."""
        check_mode(mode, self.name)
        if config is not None:
            raise ValueError(f"{self.name}: a quantization config is not supported; call quantize({mode!r}).")
        if not self.built:
            raise ValueError(f"{self.name}: cannot quantize a layer that isn't built yet.")
        if self.quantized:
            raise ValueError(f"{self.name}: the layer is already quantized ({self.quantized}).")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: cannot quantize a layer with LoRA enabled; merge or quantize first.")
        scheme, spec = scheme_for(mode), self.kernel_spec()
        values = scheme.quantize(self.kernel.value, spec.n_in, self.variable_dtype)
        install(self, scheme, scheme.create_weights(self, spec, values))

    # --- computation --------------------------------------------------------
    def local_weights(self):
        """The layer's variables as the `LocalWeights` that `local_call` takes
        (each device's shards of them, inside a sharded region)."""
        return LocalWeights(self.kernel, self.bias, self.kernel_scale, self._lora_weights())

    def local_call(self, weights, x):
        """What one device computes from its `LocalWeights` and its input
        (inside a sharded region): the layer's one sharded entry point."""
        if self.reduces and self.padding is not None and self.padding.is_padded:
            x = x * self._local_input_mask(x)
        y = self._product(self.scheme, weights, x)
        return self.activation(y) if self.activation is not None else y

    def _product(self, scheme, weights, x):
        """x times local `weights` through `scheme`, LoRA included."""
        lora_term = None
        if weights.lora is not None:
            lora_term = lambda x, out_shape: self._lora_term(weights.lora, x, out_shape)
        reduce = self.reduces and self.tp > 1
        return scheme.apply(weights, x, self.equation, len(self.in_trailing), reduce, lora_term)

    def _local_input_mask(self, x):
        """0/1 over this device's slice of the (padded) split input dims:
        zero at the padding, so that the padded rows of the kernel (and of
        LoRA's A) get no gradient from whatever the padding carried."""
        mask = real_mask(self._padding(len(self.in_trailing)))
        local = x.shape[x.ndim - len(self.in_trailing)]
        mask = jax.lax.dynamic_slice_in_dim(mask, parallel.model_index() * local, local, axis=0)
        return mask.astype(x.dtype)

    def call(self, x):
        return self.run_with_weights(
            self.local_call,
            self.local_weights(),
            (_activation_layout(x.ndim, self.in_trailing),),
            _activation_layout(x.ndim - len(self.in_trailing) + len(self.out_trailing), self.out_trailing),
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
class ColumnParallelDense(ParallelLinear):
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
        check_divisible(self.name, "units", padded_units, self.tp, PAD_WITH_CONSUMER)
        self.bias_shape = (padded_units,)
        self.output_trailing_shape = (units if gather_output else padded_units,)

    def kernel_shape(self, in_dim):
        return (in_dim, self.bias_shape[0])

    def local_call(self, weights, x):
        y = super().local_call(weights, x)
        return parallel.all_gather(y, axis=-1)[..., : self.units] if self.gather_output else y

    def get_config(self):
        config = {**super().get_config(), "units": self.units, "gather_output": self.gather_output}
        if self.gather_output:  # tp's own padding, made again at the tp it is rebuilt under
            del config["padding"]
        return config


@keras.saving.register_keras_serializable(package="tp_zoo")
class RowParallelDense(ParallelLinear):
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
        check_divisible(self.name, "input dim", in_dim, self.tp, PAD_UPSTREAM)
        return (in_dim, self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="tp_zoo")
class HeadMergeDense(ParallelLinear):
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
        check_divisible(self.name, "heads", heads, self.tp, PAD_UPSTREAM)
        return (heads, head_dim, self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}
