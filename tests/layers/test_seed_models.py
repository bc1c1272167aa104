"""The seed report's four models, sharded vs one device.

Forward, loss, gradients, and the weights after one SGD and one AdamW step,
at tp = 2 and 8 and on a dp=2 x tp=4 mesh, within
max |diff| <= 1e-5 * max(1, max |ref|). Run with `-s` to see the measured
differences.
"""

import jax
import keras
import numpy as np
import pytest

from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tests.layers.seed_models import SEED_MODELS

MESHES = [(2, 1), (8, 1), (4, 2)]  # (tp, dp): tp=4 runs inside the dp=2 mesh
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(learning_rate=0.1),
    "adamw": lambda: keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01),
}


def _loss_and_grads(model, loss_fn, x, y):
    def f(trainable, x, y):
        pred, _ = model.stateless_call(trainable, [v.value for v in model.non_trainable_variables], x)
        return loss_fn(y, pred)

    values = [v.value for v in model.trainable_variables]
    return jax.jit(jax.value_and_grad(f))(values, x, y)


def _run(name, tp, dp, initial_weights=None):
    """Everything the comparison needs, computed on one mesh."""
    keras.utils.set_random_seed(0)
    with mesh_scope(tp, dp):
        model, loss_fn, x, y = SEED_MODELS[name]()
        if initial_weights is not None:
            model.set_weights(initial_weights)
        out = {"weights_0": model.get_weights(), "forward": np.asarray(model(x))}
        loss, grads = _loss_and_grads(model, loss_fn, x, y)
        out["loss"] = np.asarray(loss)
        out["grads"] = [np.asarray(g) for g in grads]
        out["sharded"] = [(v.path, v.shape, v.value.addressable_shards[0].data.shape) for v in model.weights]
        for opt_name, make in OPTIMIZERS.items():
            model.set_weights(out["weights_0"])
            model.compile(optimizer=make(), loss=loss_fn)
            model.train_on_batch(x, y)
            out[opt_name] = model.get_weights()
    return out


@pytest.fixture(scope="module", params=sorted(SEED_MODELS))
def reference(request):
    return request.param, _run(request.param, 1, 1)


@pytest.mark.parametrize("tp,dp", MESHES, ids=[f"tp{t}_dp{d}" for t, d in MESHES])
def test_matches_single_device(reference, tp, dp):
    name, ref = reference
    got = _run(name, tp, dp, initial_weights=ref["weights_0"])
    report = {
        "forward": assert_close(ref["forward"], got["forward"], "forward"),
        "loss": assert_close(ref["loss"], got["loss"], "loss"),
        "grads": max(
            assert_close(r, g, f"gradient {i}") for i, (r, g) in enumerate(zip(ref["grads"], got["grads"]))
        ),
    }
    for opt_name in OPTIMIZERS:
        report[opt_name] = max(
            assert_close(r, g, f"{opt_name} weight {i}") for i, (r, g) in enumerate(zip(ref[opt_name], got[opt_name]))
        )
    print(f"\n{name} tp={tp} dp={dp}: " + "  ".join(f"{k}={v:.2e}" for k, v in report.items()))
    # Every variable split on the model axis holds 1/tp of its global size per device.
    shard_fractions = {path: np.prod(local) / np.prod(shape) for path, shape, local in got["sharded"]}
    assert any(f == 1 / tp for f in shard_fractions.values())
    for path, fraction in shard_fractions.items():
        assert fraction in (1.0, 1 / tp), (path, fraction)
