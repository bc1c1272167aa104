"""Comparison helpers shared by the tests."""

import contextlib
import sys

import huggingface_hub
import numpy as np

import tp_zoo
from tp_zoo.layers.base import paddings
from tp_zoo.layers.base import real_mask


def max_diff(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.max(np.abs(ref - got))) if ref.size else 0.0


def assert_close(ref, got, what, rel=1e-5):
    """max |diff| <= rel * max(1, max |ref|): the float32 tolerance of the issues."""
    diff = max_diff(ref, got)
    bound = rel * max(1.0, float(np.max(np.abs(np.asarray(ref, np.float64)))))
    assert diff <= bound, f"{what}: max |diff| {diff:.3e} > {bound:.3e}"
    return diff


def mesh_scope(tp, dp=1):
    """The distribution scope for a (dp, tp) mesh; none for a single device."""
    if tp == 1 and dp == 1:
        return contextlib.nullcontext()
    return tp_zoo.distribution(tp=tp, dp=dp).scope()


def padded_entries(variable, value=None):
    """The entries of `variable` (or of `value`, an array of its shape, such
    as an optimizer moment of it) at its tp padding."""
    value = np.asarray(variable.numpy() if value is None else value)
    return value[~np.broadcast_to(np.asarray(real_mask(paddings(variable))), value.shape)]


def is_padded(variable):
    return any(p.is_padded for p in paddings(variable))


def hub_error(cls, status, repo_id):
    """A huggingface_hub HTTP error of class `cls` (GatedRepoError...), as
    the Hub's answer of `status` for `repo_id` makes it."""
    response_cls = huggingface_hub.errors.Response  # httpx's, whichever package huggingface_hub uses
    http = sys.modules[response_cls.__module__.split(".")[0]]
    request = http.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
    return cls(f"{status} Client Error.\n\nRepository {repo_id} ...", response=response_cls(status, request=request))


def raising_snapshot_download(error):
    """A stand-in for huggingface_hub.snapshot_download that raises `error`."""

    def snapshot_download(repo_id, **kwargs):
        raise error

    return snapshot_download
