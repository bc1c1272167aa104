"""Two processes x two simulated CPU devices, joined by JAX's distributed
runtime (gloo collectives on localhost), against one process of 4 devices."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(llama_path, out, mode):
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return [
        subprocess.Popen([sys.executable, str(WORKER), str(p), port, str(llama_path), str(out), mode],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p in (0, 1)
    ]


def _run(llama_path, out, mode):
    procs = _launch(llama_path, out, mode)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [json.loads((out / f"result-{i}.json").read_text()) for i in (0, 1)]


@pytest.fixture(scope="module")
def single_process(llama_path):
    """The same work in this one process, tp=4 over 4 simulated devices."""
    from tests.parallel import multiprocess_worker_reference as ref

    return ref.run(llama_path)


def test_tp4_spanning_two_processes(llama_path, single_process, tmp_path):
    results = _run(llama_path, tmp_path, "tp4")
    for r in results:
        assert_close(single_process["logits"], r["logits"], "logits")
        assert r["greedy"] == single_process["greedy"]
        diff = max(assert_close(a, b, "loss") for a, b in zip(single_process["losses"], r["losses"]))
        assert r["restored_step"] == 3 and r["restored_equal"]
    # Each process read from the files only the blocks its own devices hold.
    for r, expected in zip(results, single_process["bytes_per_process"]):
        assert r["load_stats"]["bytes_read"] == expected
        assert expected < r["load_stats"]["checkpoint_bytes"]
    print(f"\nbytes read per process: {[r['load_stats']['bytes_read'] for r in results]} "
          f"of {results[0]['load_stats']['checkpoint_bytes']}; loss max|diff| {diff:.2e}")


@pytest.mark.parametrize("mode", ["dp2_tp2", "fsdp2_tp2"])
def test_data_parallel_over_processes_with_tp_inside_each(llama_path, single_process, tmp_path, mode):
    results = _run(llama_path, tmp_path, mode)
    for r in results:
        assert_close(single_process["losses"], r["losses"], f"{mode} losses")


def test_a_dead_process_makes_the_other_fail_in_bounded_time(llama_path, tmp_path):
    procs = _launch(llama_path, tmp_path, "die")
    start = time.monotonic()
    for p in procs:
        p.communicate(timeout=240)  # never hangs: the test would fail on the timeout
    elapsed = time.monotonic() - start
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0
    print(f"\nsurvivor failed {elapsed:.0f} s after the start (heartbeat timeout 10 s)")
