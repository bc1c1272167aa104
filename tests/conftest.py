"""Simulate 8 CPU devices; this must run before jax is imported."""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    """The tiny GQA Llama checkpoint (tests/models/checkpoints.py's
    "llama_gqa_llama3_rope", written by transformers) most model tests share."""
    from tests.models import checkpoints as ckpts

    path = tmp_path_factory.mktemp("llama_gqa")
    ckpts.save(ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"]), path)
    return path
