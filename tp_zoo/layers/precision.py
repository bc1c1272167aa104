"""The precision of the layers' matrix products: float32 means float32.

On NVIDIA GPUs JAX's default multiplies float32 matrices in TF32 (inputs
rounded to 10 mantissa bits, about 1e-3 relative error), where torch and
transformers compute float32 in float32. So every product with a float32
operand asks for `Precision.HIGHEST`, unless the user has set JAX's own
`jax_default_matmul_precision` (config, `JAX_DEFAULT_MATMUL_PRECISION`, or
the `jax.default_matmul_precision(...)` context around the first call),
which then decides for every product, as it does in plain JAX. Products of
16-bit operands are left to JAX's default: HIGHEST would only slow them. On
CPUs float32 products are float32 either way.
"""

import jax
import jax.numpy as jnp


def product_precision(*operands):
    """`precision=` for a product (einsum, dot) of `operands`: HIGHEST when
    one is float32 and the user has not set JAX's default, else None."""
    if jax.config.jax_default_matmul_precision is not None:
        return None
    if any(jnp.dtype(x.dtype) == jnp.float32 for x in operands):
        return jax.lax.Precision.HIGHEST
    return None
