"""The float kernel: stored as the layer's variable dtype, multiplied as it is."""

import jax.numpy as jnp

from tp_zoo.layers.precision import product_precision
from tp_zoo.layers.quantize.scheme import QuantizationScheme


class FloatScheme(QuantizationScheme):
    """No quantization: one trainable `kernel` (*in_dims, *out_dims)."""

    def create_weights(self, layer, spec, values=None):
        initializer = spec.initializer if values is None else values["kernel"]
        kernel = layer.add_sharded_weight(
            "kernel", spec.shape, spec.layout, initializer, padding=spec.padding, parts=spec.parts
        )
        return {"kernel": kernel}

    def stored_bytes(self, entries, outputs, itemsize):
        return entries * itemsize

    def quantize(self, kernel, n_in, dtype):
        return {"kernel": kernel.astype(dtype)}

    def fast_product(self, x, weights, equation):
        return jnp.einsum(equation, x, weights.kernel, precision=product_precision(x, weights.kernel))

    def product(self, x, weights, equation, n_in):
        kernel = weights.kernel
        return jnp.einsum(
            equation, x, kernel, precision=product_precision(x, kernel), preferred_element_type=jnp.float32
        )

    def dequantize(self, weights, dtype=jnp.float32):
        return weights.kernel.astype(dtype)

    def cut_outputs(self, weights, n_in, out_dim, cut):
        return weights._replace(kernel=cut(weights.kernel, n_in + out_dim))
