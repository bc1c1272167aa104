"""AdamW that trains 16-bit weights: its arithmetic is float32 whatever the
weights' dtype.

Keras' Adam and AdamW compute in the variable's dtype: in bfloat16,
beta_2 = 0.999 rounds to 1, the bias correction sqrt(1 - beta_2^t) is 0,
and every update is zero (keras-hub issue #2629). Even with the step size
right, an update of lr x ~1 = 1e-5 is far below half a bfloat16 ulp of a
weight of 0.02 (6e-5), so rounding to nearest would drop it.

This AdamW keeps both moments in float32 and computes the update, weight
decay included, in float32. A float32 weight takes it as is; a bfloat16
weight takes it with stochastic rounding (to the bfloat16 above or below,
with the probabilities that make the rounding unbiased), so that updates
smaller than an ulp still move the weight on average (Zamirai et al.,
"Revisiting BFloat16 Training", 2020). Against float32 master weights it
saves 4 bytes per parameter (a float32 copy) and the cast of every weight
each step; against Kahan-compensated updates, 2 bytes per parameter.
Exactly representable results stay exact, so weights whose update is zero
(tp padding, frozen entries) never move.
"""

import jax
import jax.numpy as jnp
import keras

# Optimizers tp_zoo remakes as its own AdamW (same hyperparameters) when
# the model trains 16-bit weights: their math is Adam's.
_ADAM_CLASSES = (keras.optimizers.Adam, keras.optimizers.AdamW)


def stochastic_round_bf16(x, bits):
    """float32 `x` to bfloat16, rounded up in magnitude with probability
    equal to the dropped fraction: the dropped low 16 bits of each float32
    are compared with uniform random `bits` (uint16) by adding them and
    truncating. Values that are bfloat16 already are returned exactly."""
    raw = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    raw = (raw + bits.astype(jnp.uint32)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(raw, jnp.float32).astype(jnp.bfloat16)


@keras.saving.register_keras_serializable(package="tp_zoo")
class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW (same arguments and defaults), computed in float32:
    moments in float32, bfloat16 weights updated with stochastic rounding
    (see the module's docstring). `seed` fixes the rounding's random bits,
    so a run (and a resumed one) is repeatable.

    ```python
    lm = tp_zoo.from_preset("llama3.2_1b", tp=2)    # bfloat16 weights
    lm.compile(optimizer=tp_zoo.optimizers.AdamW(learning_rate=1e-5))
    ```

    `compile` makes one of these from a Keras Adam or AdamW (and from the
    default), so `lm.compile(optimizer=keras.optimizers.AdamW(1e-5))` trains
    bfloat16 weights too.
    """

    def __init__(self, *args, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.amsgrad:
            raise ValueError("tp_zoo.optimizers.AdamW does not implement amsgrad; use amsgrad=False.")
        self.seed = seed

    def build(self, var_list):
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, var_list)
        self._momentums, self._velocities = [], []
        for variable in var_list:
            for name, moments in (("momentum", self._momentums), ("velocity", self._velocities)):
                moments.append(self.add_variable(
                    shape=variable.shape, dtype="float32", layout=getattr(variable, "_layout", None),
                    name=f"{variable.path.replace('/', '_')}_{name}",
                ))

    def _apply_weight_decay(self, variables):
        """Folded into `update_step`, in float32 (Keras applies it in the
        weight's dtype, where lr x decay rounds away)."""

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        g, lr = f32(gradient), f32(learning_rate)
        step = f32(self.iterations.value + 1)
        m.assign(m.value + (g - m.value) * (1 - self.beta_1))
        v.assign(v.value + (g * g - v.value) * (1 - self.beta_2))
        alpha = lr * jnp.sqrt(1 - f32(self.beta_2) ** step) / (1 - f32(self.beta_1) ** step)
        w = f32(variable.value)
        if self.weight_decay and self._use_weight_decay(variable):
            w = w - w * f32(self.weight_decay) * lr
        w = w - m.value * alpha / (jnp.sqrt(v.value) + self.epsilon)
        if jnp.dtype(variable.dtype) == jnp.bfloat16:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), self.iterations.value), index)
            w = stochastic_round_bf16(w, jax.random.bits(key, w.shape, jnp.uint16))
        variable.assign(w.astype(variable.dtype))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def for_training(optimizer):
    """`optimizer` as compile should use it: a Keras Adam or AdamW (or its
    name) becomes a tp_zoo AdamW of the same hyperparameters (Adam's with
    no weight decay); anything else is returned as it is (see
    `check_trains`)."""
    if isinstance(optimizer, str) and optimizer.lower() in ("adam", "adamw"):
        optimizer = keras.optimizers.get(optimizer)
    if type(optimizer) in _ADAM_CLASSES and not optimizer.amsgrad:
        config = optimizer.get_config()
        if type(optimizer) is keras.optimizers.Adam:
            config["weight_decay"] = 0.0
        return AdamW.from_config(config)
    return optimizer


def check_trains(optimizer, variables):
    """ValueError, in one line, for an optimizer that cannot train these
    variables: float16 weights (their gradients underflow without loss
    scaling, which needs float32 weights), or bfloat16 weights under an
    optimizer that computes in their dtype (Keras' own: small updates round
    to nothing)."""
    half = [v for v in variables if jnp.dtype(v.dtype) == jnp.float16]
    if half:
        raise ValueError(
            f"float16 weights ({half[0].path}, and {len(half) - 1} more) cannot train: load the model with "
            "dtype='mixed_float16' (float32 weights, float16 compute, loss scaling) or dtype='bfloat16'."
        )
    bf16 = [v for v in variables if jnp.dtype(v.dtype) == jnp.bfloat16]
    if bf16 and not isinstance(getattr(optimizer, "inner_optimizer", optimizer), AdamW):
        raise ValueError(
            f"{type(optimizer).__name__} updates bfloat16 weights ({bf16[0].path}, and {len(bf16) - 1} more) in "
            "bfloat16, where small updates round to nothing: use tp_zoo.optimizers.AdamW (or Keras' Adam/AdamW, "
            "which compile replaces by it), or load the model with dtype='mixed_bfloat16' (float32 weights)."
        )
