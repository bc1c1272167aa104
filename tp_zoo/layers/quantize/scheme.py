"""What a quantization scheme is: the one interface every kernel format
(float, int8, ...) answers, so that a layer's forward, the checkpoint
loader, export and LoRA never ask which format a kernel is in.

A layer holds a scheme (`layer.scheme`). The scheme makes the layer's
kernel variables (`create_weights`: `kernel`, and `kernel_scale` where it
has one), turns a float kernel into them (`quantize`), multiplies an input
by a device's local kernel (`apply`) and turns the local kernel back into
floats (`dequantize`, for LoRA merges and export). A checkpoint source makes
its variables from the float kernel's tensors (`FromKernel`, `statistic`,
`quantize_block`).
"""

from typing import NamedTuple

import jax.numpy as jnp

from tp_zoo import parallel


class LocalWeights(NamedTuple):
    """A linear layer's weights as one device holds them, by name (a pytree:
    variables outside a sharded region, their local shards inside): the
    kernel as its scheme stores it, the bias (None without), the scheme's
    scale (None without) and the LoRA adapters, one (A, B) per adapted part
    (None without LoRA)."""

    kernel: object
    bias: object = None
    scale: object = None
    lora: tuple = None


class KernelSpec(NamedTuple):
    """The float kernel a scheme stores: global `shape` (*in_dims,
    *out_dims), `layout`, `padding` (an `AxisPadding` per dim), `n_in`
    input dims, the `Fused` parts of the kernel and of its output dims
    (None: not fused) and the float kernel's initializer."""

    shape: tuple
    layout: tuple
    padding: tuple
    n_in: int
    parts: object = None
    out_parts: object = None
    initializer: object = None


class FromKernel(NamedTuple):
    """How a weight source reading a float checkpoint makes one of a
    scheme's variables from the float kernel's tensors: role "statistic",
    `scheme.statistic` of the kernel's max |w| per output channel (over
    its input dims; `out_padding` and `out_parts` those dims' paddings and
    `Fused` parts), made before the values; role "values", each block read
    as the kernel's, in the variable's order (its last `inputs_last` dims
    the kernel's first), through `scheme.quantize_block`."""

    scheme: object
    role: str
    out_padding: tuple = ()
    out_parts: object = None
    inputs_last: int = 0


class QuantizationScheme:
    """One kernel format. Subclasses set `mode` (the name `quantize()` takes;
    None for float), `description` (for error messages) and implement the
    methods below that raise NotImplementedError."""

    mode = None
    description = ""

    # --- variables -------------------------------------------------------------
    def create_weights(self, layer, spec, values=None):
        """{attribute name: variable} of the layer's kernel, made in this order
        (saved files follow it) through `layer.add_sharded_weight`; from
        `values` (this scheme's `quantize` of a float kernel), else from
        initializers (a checkpoint source fills them instead)."""
        raise NotImplementedError

    def quantize(self, kernel, n_in, dtype):
        """{attribute name: global array} of a float kernel (*in, *out) of
        `n_in` input dims, for `create_weights` or to assign (a LoRA merge);
        `dtype`: the layer's variable dtype."""
        raise NotImplementedError

    # --- the product on one device ---------------------------------------------
    def fast_product(self, x, weights, equation):
        """x times the local kernel in x's dtype, for an output that needs no
        float32 sum (no bias, LoRA or all-reduce); None where the scheme has
        no such product."""
        return None

    def product(self, x, weights, equation, n_in):
        """x times the local kernel, accumulated in float32, before `rescale`:
        linear in the kernel, so partial sums over devices add up."""
        raise NotImplementedError

    def rescale(self, y, weights):
        """A float32 product times the scheme's per-output factor (y itself
        for a scheme without one)."""
        return y

    def apply(self, weights, x, equation, n_in, reduce=False, lora_term=None):
        """The linear map of local `weights` (`LocalWeights`) on x, inside a
        sharded region: summed over devices when `reduce` (row-parallel),
        biased in float32 and rounded once to x's dtype, as torch's addmm
        (rounding the product before its bias, or each device's partial
        sum, costs visible bf16 accuracy). A per-output scale is the same
        on every device, so it comes after the sum, unless LoRA's partial
        sums (`lora_term(x, out_shape)`, float32) join the product first."""
        if lora_term is None and weights.bias is None and not reduce:
            y = self.fast_product(x, weights, equation)
            if y is not None:
                return y
        y = self.product(x, weights, equation, n_in)
        if lora_term is not None:
            y = self.rescale(y, weights) + lora_term(x, y.shape[x.ndim - n_in :])
        if reduce:
            y = parallel.all_reduce(y)
        if lora_term is None:
            y = self.rescale(y, weights)
        if weights.bias is not None:
            y = y + weights.bias.astype(jnp.float32)
        return y.astype(x.dtype)

    def dequantize(self, weights, dtype=jnp.float32):
        """The local (or global) kernel of `weights` as floats of `dtype`, in
        the order the kernel variable stores it."""
        raise NotImplementedError

    def cut_outputs(self, weights, n_in, out_dim, cut):
        """`weights` with `cut(array, axis)` applied to the kernel (and the
        scale) along the kernel's output dim `out_dim` and the dim after it
        (a replicated q/k/v kernel cut down to one device's heads)."""
        raise NotImplementedError

    # --- loading and memory ------------------------------------------------------
    def statistic(self, amax):
        """The value (host) of a "statistic" variable (`FromKernel`) from the
        float kernel's max |w| per output channel (padded, 0 at padding)."""
        raise NotImplementedError

    def quantize_block(self, block, statistic, box):
        """A "values" variable's block (on its device) from the float block
        read in the variable's order; `box` ((start, stop) per dim) where
        it lies, `statistic` the whole statistic (host) or None."""
        raise NotImplementedError

    def stored_bytes(self, entries, outputs, itemsize):
        """Bytes a kernel of `entries` weights and `outputs` output channels
        is stored in, for a layer whose variables are of `itemsize` (a
        memory estimate made before the model is built)."""
        raise NotImplementedError

    def product_copy_bytes(self, kernel_shape, itemsize):
        """Bytes of the copy of a kernel of `kernel_shape` the product makes
        in the compute dtype (of `itemsize`), 0 where it reads it as stored."""
        return 0


def use_own_quantize(obj):
    """Drops the wrapper Keras puts around an instance's `quantize` (its
    config resolution and checks answer unknown modes with Keras' messages
    and pass a config object), so that the class's own method runs."""
    obj.__dict__.pop("quantize", None)


def install(layer, scheme, weights):
    """Puts a scheme's kernel variables (`create_weights`) in place of the
    layer's float kernel: tracked in their order, the order build() makes
    them in (saved files follow it); drops the layer's compiled programs."""
    layer._tracker.unlock()
    layer._untrack_variable(layer.kernel)
    for name, variable in weights.items():
        setattr(layer, name, variable)
    layer._tracker.lock()
    layer.scheme = scheme
    layer._sharded_programs = {}
