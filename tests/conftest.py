"""Simulate 8 CPU devices; this must run before jax is imported. On a GPU
machine JAX's default backend is still the GPU: the tests marked `gpu` run
there (`python -m pytest -m gpu`) and are skipped elsewhere."""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The test workers share the GPUs: each takes memory as it needs it, not
# most of every GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs JAX on NVIDIA GPUs (skipped elsewhere); run with -m gpu")


def pytest_collection_modifyitems(config, items):
    """The gpu tests skipped where JAX's default backend is not a GPU."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import jax

    from tp_zoo import parallel

    if not parallel.on_gpu():
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU; JAX's default backend here is {jax.default_backend()}")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    """The tiny GQA Llama checkpoint (tests/models/checkpoints.py's
    "llama_gqa_llama3_rope", written by transformers) most model tests share."""
    from tests.models import checkpoints as ckpts

    path = tmp_path_factory.mktemp("llama_gqa")
    ckpts.save(ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"]), path)
    return path
