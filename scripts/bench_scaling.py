"""Does tensor parallelism pay? tp_zoo's Llama at tp=1 and tp=2 (and dp=2 for
training) on the same shapes, every figure beside its hardware floor.

    python scripts/bench_scaling.py                                 # every row
    python scripts/bench_scaling.py --rows decode8b prefill8b       # row names, or prefixes of several
    python scripts/bench_scaling.py --small                         # CPU smoke run: every shape tiny

Rows (random weights, bf16, greedy; KerasHub's own single-device Llama
beside the tp=1 decode rows of the 8B shape unless --skip-keras-hub):

  decode8b_b1         Llama-3-8B shape, batch 1, prompt 128, +128 new: ms/token
  decode8b_b16        8B, batch 16, prompt 128, +64
  decode8b_b16_p1024  8B, batch 16, prompt 1024, +64
  decode70b_b1        Llama-3-70B shape, batch 1, prompt 128, +128, tp >= 2 only
                      (141 GB of bf16 weights do not fit one GPU)
  decode70b_b16       70B, batch 16, prompt 128, +64, tp >= 2 only
  int8_decode8b_b1    the 8B rows with weight-only int8 (KerasHub's own int8 beside
  int8_decode8b_b16     tp=1); `--rows int8` runs the three
  int8_decode70b_b1   70B int8, batch 1 (66.7 GiB: fits one H200)
  prefill8b           8B, one forward pass (logits of every position) of 1 x 2048 tokens: ms
  train1b             Llama-3.2-1B shape, mixed_bfloat16, AdamW, 8 x 1024 tokens per
                      replica: tokens/s at tp=1, tp=2 and dp=2 (16 x 1024 in all; dp=2
                      runs when --tp has 1)
  train8b             8B full fine-tune, the same at 4 x 1024, tp >= 2 only (float32
                      weights, gradients and AdamW moments: 128 GB)
  fsdp8b              8B full fine-tune in bf16 (tp_zoo's AdamW: float32 moments,
                      stochastic rounding; 95 GiB at 4 x 1024 on one H200), 4 x 1024
                      per device: one GPU (fsdp=1), fsdp=2 (the state split over two
                      GPUs) and tp=2, whatever --tp says
  load8b              an 8B bf16 safetensors checkpoint, written once (--checkpoint-dir
                      keeps it) and read into the page cache, loaded at each tp: GB/s

Figures and their floors, per device:
  - decode: ms per new token as bench_decode.py's per-token rows,
    (t(prompt + new) - t(prompt + 1)) / (new - 1), each t the best of
    --repeats generate() calls after a warm-up. Floor = (weight bytes / tp +
    batch x (prompt + new) x KV bytes per token / min(tp, kv heads)) /
    --bandwidth: the bytes one device reads per step, at bench_decode.py's
    4.3 TB/s (bench_common.HBM_BANDWIDTH).
  - prefill: ms, best of --prefill-repeats after a warm-up, as
    bench_prefill.py. Floor = 2 x the parameters a token multiplies by
    (attention and MLP kernels, LM head; not the token table) x tokens / tp
    / --peak; attention's score and value products are left out, so the
    floor is low by about 4% at 2048 tokens.
  - train: tokens/s, the median of --steps train_on_batch steps after
    --warmup, as bench_train.py; model TFLOP/s per device = 6 x trainable
    parameters x tokens/s / devices (bench_common.training_flops; attention's
    products not counted), as a share of --peak (790 TFLOP/s, about what a
    large bf16 matmul reaches on one H200: bench_common.BF16_PEAK_FLOPS;
    the header gives this run's own 8192^3 product).
  - load: checkpoint bytes / seconds of tp_zoo.from_preset until every
    weight is on its devices, as bench_load.py (in this process; no memory
    figures). Bound = the host-to-device copy rate measured in the same run
    (jax.device_put of 1 GiB from host memory, split over the same devices).
The speed-up column is tp_zoo tp=1's figure against the row's (above 1:
faster than tp=1); KerasHub's figures are a reference, without one.

Time: a device call lasts at most 10 minutes, so the rows run in order of
importance (tp_zoo's decode and prefill, 70B, training, loading, then
KerasHub's decode), each model build and each (row, model) in a time box
(--row-timeout), and no row starts after --time-limit seconds from the
start; a row inside a compile stops when the compile returns. A row that
fails or times out prints its error and the others go on. Rows whose
devices are missing print "not run (needs N devices)". The table comes last.
"""

import time

START = time.monotonic()  # --time-limit counts imports and device start-up too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import BF16_PEAK_FLOPS  # noqa: E402
from bench_common import HBM_BANDWIDTH  # noqa: E402
from bench_common import best_forward_time  # noqa: E402
from bench_common import best_time  # noqa: E402
from bench_common import checkpoint_config  # noqa: E402
from bench_common import compile_for_training  # noqa: E402
from bench_common import copy_bandwidth  # noqa: E402
from bench_common import decode_bytes_per_device  # noqa: E402
from bench_common import decode_floor_ms  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import jax  # noqa: E402
from bench_common import keras  # noqa: E402
from bench_common import keras_hub_model  # noqa: E402
from bench_common import matmul_rate  # noqa: E402
from bench_common import median_step_time  # noqa: E402
from bench_common import per_token_ms  # noqa: E402
from bench_common import read_into_page_cache  # noqa: E402
from bench_common import timed_load  # noqa: E402
from bench_common import tp_zoo_model  # noqa: E402
from bench_common import trainable_parameters  # noqa: E402
from bench_common import training_flops  # noqa: E402
from bench_common import write_llama_checkpoint  # noqa: E402

import numpy as np  # noqa: E402

import tp_zoo  # noqa: E402

DTYPE = "bfloat16"
SHAPE_NAMES = {"llama3_1b": "1B", "llama3_8b": "8B", "llama3_70b": "70B"}
SMALL_SCALE = 16  # --small: contexts and sequences / 16, as bench_decode.py's tiny runs


@dataclasses.dataclass
class Decode:
    shape: str
    batch: int
    prompt: int
    new: int
    min_tp: int = 1  # 70B: 141 GB of bf16 weights need two H200s
    quantized: str = None  # "int8": weight-only int8 kernels


@dataclasses.dataclass
class Prefill:
    shape: str
    tokens: int


@dataclasses.dataclass
class Train:
    shape: str
    batch: int  # per replica
    seq: int
    extra_meshes: tuple  # (tp, dp) meshes beside --tp's (tp, 1) ones, run when --tp has 1: dp=2
    min_tp: int = 1  # 8B: weights, gradients and AdamW moments in float32 (128 GB) need two H200s
    dtype: str = "mixed_bfloat16"
    meshes: tuple = ()  # (tp, data devices, fully sharded): these in place of --tp's


@dataclasses.dataclass
class Load:
    shape: str


# In the order they print; jobs() decides the order they run in. A decode
# row compiles tp_zoo's generate for t(+new) and t(+1): one program when both
# fall in one cache bucket (the +64 rows), two for +128.
ROWS = {
    "decode8b_b1": Decode("llama3_8b", 1, 128, 128),
    "decode8b_b16": Decode("llama3_8b", 16, 128, 64),
    "decode8b_b16_p1024": Decode("llama3_8b", 16, 1024, 64),
    "decode70b_b1": Decode("llama3_70b", 1, 128, 128, min_tp=2),
    "decode70b_b16": Decode("llama3_70b", 16, 128, 64, min_tp=2),
    "int8_decode8b_b1": Decode("llama3_8b", 1, 128, 128, quantized="int8"),
    "int8_decode8b_b16": Decode("llama3_8b", 16, 128, 64, quantized="int8"),
    "int8_decode70b_b1": Decode("llama3_70b", 1, 128, 128, quantized="int8"),
    "prefill8b": Prefill("llama3_8b", 2048),
    "train1b": Train("llama3_1b", 8, 1024, extra_meshes=((1, 2),)),
    "train8b": Train("llama3_8b", 4, 1024, extra_meshes=(), min_tp=2),
    "fsdp8b": Train("llama3_8b", 4, 1024, extra_meshes=(), dtype="bfloat16",
                    meshes=((1, 1, False), (1, 2, True), (2, 1, False))),
    "load8b": Load("llama3_8b"),
}


@dataclasses.dataclass
class Figure:
    value: float
    unit: str
    bound: float
    lower_is_better: bool  # a time (bound: a floor) or a rate (bound: a peak)
    comparable: bool = True  # whether the speed-up column applies


@dataclasses.dataclass
class Cell:
    """One row measured on one model: its figures, or why there are none."""

    row: str
    model: str  # "tp_zoo tp=2", "tp_zoo tp=1 dp=2", "tp_zoo tp=1 fsdp=2", "KerasHub tp=1"
    tp: int
    dp: int = 1
    figures: list = dataclasses.field(default_factory=list)
    note: str = ""  # "not run (...)" or "error: ..."


@dataclasses.dataclass
class Job:
    """One model (or, for loading, one checkpoint) and the cells measured on it."""

    build: object  # () -> the model (or the checkpoint's directory)
    cells: list
    measures: list  # per cell: (what build returned) -> [Figure]


class Clock:
    """The time each step may take: its --row-timeout, cut to what is left of --time-limit."""

    MINIMUM = 10  # seconds: with less left, a step is not started

    def __init__(self, row_timeout, time_limit):
        self.row_timeout, self.time_limit = row_timeout, time_limit

    def left(self):
        return self.time_limit - (time.monotonic() - START)

    def budget(self):
        return min(self.row_timeout, self.left())


@contextlib.contextmanager
def time_box(seconds):
    """Raises TimeoutError in the main thread after `seconds`: at once in
    Python code, when the call returns inside a compile or a device run."""

    def expire(signum, frame):
        raise TimeoutError(f"stopped after its {seconds:.0f} s time box")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def forward_flops_per_token(config):
    """2 x the parameters one token multiplies by: attention and MLP kernels
    of every layer, and the LM head (not the token table, not the norms)."""
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f
    return 2 * (config["num_hidden_layers"] * per_layer + config["vocab_size"] * h)


def host_to_device_rate(devices, nbytes=2**30):
    """Bytes per second of jax.device_put from host memory, split evenly over
    `devices`: what loading a checkpoint cannot beat (best of 3)."""
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    host = np.ones((len(devices), nbytes // len(devices)), np.uint8)
    return nbytes / best_time(lambda: jax.device_put(host, sharding), 3)


class Bench:
    """The rows' measurements, with the run's options."""

    def __init__(self, args):
        self.args = args
        self.scale = SMALL_SCALE if args.small else 1
        self.temporary_folders = []  # checkpoints written for this run only

    def config(self, shape):
        return hf_config("tiny" if self.args.small else shape)

    def describe(self, name):
        spec = ROWS[name]
        size = f"tiny({SHAPE_NAMES[spec.shape]})" if self.args.small else SHAPE_NAMES[spec.shape]
        if isinstance(spec, Decode):
            quantized = f" {spec.quantized}" if spec.quantized else ""
            return f"{size}{quantized} decode b{spec.batch} p{spec.prompt // self.scale} +{spec.new}"
        if isinstance(spec, Prefill):
            return f"{size} prefill 1 x {spec.tokens // self.scale}"
        if isinstance(spec, Train):
            return f"{size} train {spec.batch} x {spec.seq // self.scale}/replica"
        return f"{size} bf16 checkpoint load"

    def decode(self, spec, tp):
        config = self.config(spec.shape)
        prompt = spec.prompt // self.scale

        def measure(lm):
            weights, kv = decode_bytes_per_device(lm, config, tp, np.dtype(DTYPE).itemsize)
            ms = per_token_ms(lm, spec.batch, prompt, spec.new, self.args.repeats)
            floor = decode_floor_ms(weights, kv, spec.batch, prompt + spec.new, self.args.bandwidth)
            return [Figure(ms, "ms/token", floor, lower_is_better=True)]

        return measure

    def prefill(self, spec, tp):
        config = self.config(spec.shape)
        tokens = spec.tokens // self.scale

        def measure(lm):
            ms = 1000 * best_forward_time(lm, tokens, self.args.prefill_repeats)
            floor = 1000 * tokens * forward_flops_per_token(config) / tp / self.args.peak
            return [Figure(ms, "ms", floor, lower_is_better=True)]

        return measure

    def train(self, spec, tp, dp):
        config = self.config(spec.shape)
        batch, seq = spec.batch * dp, spec.seq // self.scale

        def measure(lm):
            seconds = median_step_time(lm, batch, seq, config["vocab_size"], self.args.warmup, self.args.steps)
            tokens = batch * seq / seconds
            flops_per_token = training_flops(trainable_parameters(lm), 1)
            per_device = flops_per_token * tokens / (tp * dp)
            return [Figure(tokens, "tokens/s", tp * dp * self.args.peak / flops_per_token, lower_is_better=False),
                    Figure(per_device / 1e12, "TFLOP/s/device", self.args.peak / 1e12, lower_is_better=False,
                           comparable=False)]

        return measure

    def load(self, tp):
        def measure(directory):
            lm, seconds = timed_load(directory, tp)
            del lm
            gc.collect()
            nbytes = (directory / "model.safetensors").stat().st_size
            bound = host_to_device_rate(jax.devices()[:tp])
            return [Figure(nbytes / seconds / 1e9, "GB/s", bound / 1e9, lower_is_better=False)]

        return measure

    def checkpoint(self, shape):
        """The checkpoint load8b reads: --checkpoint-dir's if it holds this
        shape's, else written there (or to a temporary folder), then read
        into the page cache."""
        name = "tiny" if self.args.small else shape
        if self.args.checkpoint_dir:
            directory = Path(self.args.checkpoint_dir)
        else:
            directory = Path(tempfile.mkdtemp(prefix="tp_zoo_scaling_"))
            self.temporary_folders.append(directory)
        config_file = directory / "config.json"  # written last: its presence means a whole checkpoint
        if not (config_file.is_file() and json.loads(config_file.read_text()) == checkpoint_config(name)):
            print(f"writing the {name} checkpoint to {directory}", flush=True)
            write_llama_checkpoint(directory, name)
        read_into_page_cache(directory / "model.safetensors")
        return directory


def greedy(lm):
    lm.compile(sampler="greedy")
    return lm


def for_training(lm):
    compile_for_training(lm)
    return lm


def model_name(tp, dp, fully_sharded=False):
    return f"tp_zoo tp={tp}" + (f" {'fsdp' if fully_sharded else 'dp'}={dp}" if dp > 1 else "")


def model_job(bench, shape, dtype, tp, dp, prepare, measured, quantized=None, fully_sharded=False):
    """A job on tp_zoo's Llama of `shape` (its int8 form with quantized="int8")
    on a (dp, tp) mesh (the variables split over dp too if `fully_sharded`),
    made ready by `prepare`; `measured` lists (row, measure) pairs."""
    config = bench.config(shape)
    cells = [Cell(name, model_name(tp, dp, fully_sharded), tp, dp) for name, _ in measured]
    data = {"fsdp": dp} if fully_sharded else {"dp": dp}
    return Job(lambda: prepare(tp_zoo_model(config, tp, dtype, quantized, **data)), cells,
               [m for _, m in measured])


def jobs(bench, rows, tps, skip_keras_hub):
    """The jobs in the order they run (tp_zoo's decode and prefill first,
    KerasHub's last: the time limit cuts the reference, not the subject),
    and the cells that no tp in `tps` may run."""
    plan, impossible = [], []
    for name in rows:
        for tp in tps:
            if tp < getattr(ROWS[name], "min_tp", 1):
                impossible.append(Cell(name, model_name(tp, 1), tp,
                                       note=f"not run (tp >= {ROWS[name].min_tp} only: too big for one H200)"))
    for shape, quantized in itertools.product(("llama3_8b", "llama3_70b"), (None, "int8")):
        for tp in tps:
            measured = [(n, bench.decode(ROWS[n], tp)) for n in rows
                        if isinstance(ROWS[n], Decode) and (ROWS[n].shape, ROWS[n].quantized) == (shape, quantized)
                        and tp >= ROWS[n].min_tp]
            if quantized is None:
                measured += [(n, bench.prefill(ROWS[n], tp)) for n in rows
                             if isinstance(ROWS[n], Prefill) and ROWS[n].shape == shape]
            if measured:
                plan.append(model_job(bench, shape, DTYPE, tp, 1, greedy, measured, quantized))
    for name in rows:
        spec = ROWS[name]
        if isinstance(spec, Train):
            meshes = spec.meshes or [(tp, 1, False) for tp in tps if tp >= spec.min_tp] + (
                [(tp, dp, False) for tp, dp in spec.extra_meshes] if 1 in tps else [])
            for tp, dp, fully_sharded in meshes:
                plan.append(model_job(bench, spec.shape, spec.dtype, tp, dp, for_training,
                                      [(name, bench.train(spec, tp, dp))], fully_sharded=fully_sharded))
        if isinstance(spec, Load):
            cells = [Cell(name, model_name(tp, 1), tp) for tp in tps]
            plan.append(Job(lambda spec=spec: bench.checkpoint(spec.shape), cells, [bench.load(tp) for tp in tps]))
    config = bench.config("llama3_8b")
    for quantized in (None, "int8"):
        decode_rows = [n for n in rows if isinstance(ROWS[n], Decode)
                       and (ROWS[n].shape, ROWS[n].quantized) == ("llama3_8b", quantized)]
        if not skip_keras_hub and 1 in tps and decode_rows:
            plan.append(Job(lambda quantized=quantized: greedy(keras_hub_model(config, DTYPE, quantized)),
                            [Cell(n, "KerasHub tp=1", 1) for n in decode_rows],
                            [bench.decode(ROWS[n], 1) for n in decode_rows]))
    return plan, impossible


def error_text(error, during=""):
    """The error in one line, for the table; a failure (not a time box) also
    prints its last frames, for whoever reads the run's output."""
    if not isinstance(error, TimeoutError):
        print("".join(traceback.format_exception(error, limit=-4)), flush=True)
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"error{during}: {type(error).__name__}: {first_line}"


def run_job(job, clock):
    """Builds the job's model and measures each of its cells (those without a
    note yet), each in a time box; the model is freed when this returns."""
    to_run = [(cell, measure) for cell, measure in zip(job.cells, job.measures) if not cell.note]
    if not to_run:
        return
    if clock.left() < clock.MINIMUM:
        for cell, _ in to_run:
            cell.note = "not run (past --time-limit)"
        return
    keras.utils.set_random_seed(0)
    try:
        with time_box(clock.budget()):
            built = job.build()
    except Exception as error:  # a failure of one model must not stop the others
        note = error_text(error, " building the model")
        for cell, _ in to_run:
            cell.note = note
        print(f"{to_run[0][0].model}: {note}", flush=True)
        return
    for cell, measure in to_run:
        if clock.left() < clock.MINIMUM:
            cell.note = "not run (past --time-limit)"
            continue
        try:
            with time_box(clock.budget()):
                cell.figures = measure(built)
        except Exception as error:
            cell.note = error_text(error)
        print(f"{cell.row} {cell.model}: " + (cell.note or "; ".join(
            f"{number(f.value)} {f.unit} ({against_bound(f)})" for f in cell.figures)), flush=True)


def number(value):
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}" if size >= 0.01 or size == 0 else f"{value:.2e}"  # CPU smoke runs' tiny floors


def against_bound(figure):
    if figure.lower_is_better:
        return f"{figure.value / figure.bound:.2f}x floor {number(figure.bound)}"
    return f"{figure.value / figure.bound:.0%} of {number(figure.bound)}"


def print_table(cells, bench):
    reference = {(c.row, f.unit): f.value for c in cells if c.model == "tp_zoo tp=1" for f in c.figures}
    print(f"{'row':<34}{'model':<19}{'value':>10}  {'unit':<16}{'vs floor / bound':<26}{'speed-up vs tp=1':>16}")
    for cell in cells:
        what = bench.describe(cell.row)
        if not cell.figures:
            print(f"{what:<34}{cell.model:<19}{cell.note}")
        for i, figure in enumerate(cell.figures):
            speed_up = ""
            ref = reference.get((cell.row, figure.unit))
            if figure.comparable and ref and cell.model not in ("tp_zoo tp=1", "KerasHub tp=1"):
                speed_up = f"{(ref / figure.value if figure.lower_is_better else figure.value / ref):.2f}x"
            label = (what, cell.model) if i == 0 else ("", "")
            print(f"{label[0]:<34}{label[1]:<19}{number(figure.value):>10}  {figure.unit:<16}"
                  f"{against_bound(figure):<26}{speed_up:>16}")


def table_order(cell):
    """By row, then tp_zoo by mesh (tp=1, tp=2, dp=2), KerasHub last."""
    return list(ROWS).index(cell.row), cell.model.startswith("KerasHub"), cell.dp, cell.tp


def selected_rows(names):
    """The rows named, or (for a name that is no row's) those whose name
    starts with it: decode8b_b16 is one row, decode8b three."""
    if not names:
        return list(ROWS)
    unknown = [p for p in names if not any(n.startswith(p) for n in ROWS)]
    if unknown:
        raise SystemExit(f"--rows: no row starts with {unknown}; the rows are {', '.join(ROWS)}")
    return [n for n in ROWS if any(n == p or (p not in ROWS and n.startswith(p)) for p in names)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="these rows (a prefix: every row it starts)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--small", action="store_true", help="every shape tiny, contexts / 16: a CPU smoke run")
    parser.add_argument("--skip-keras-hub", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="decode: best of this many, after a warm-up")
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="train: steps before the timed ones")
    parser.add_argument("--steps", type=int, default=4, help="train: timed steps (the median counts)")
    parser.add_argument("--bandwidth", type=float, default=HBM_BANDWIDTH, help="bytes/s of the decode floors")
    parser.add_argument("--peak", type=float, default=BF16_PEAK_FLOPS, help="FLOP/s of the compute floors")
    parser.add_argument("--checkpoint-dir", help="where load8b's checkpoint is kept (default: a temporary folder)")
    parser.add_argument("--row-timeout", type=float, default=300, help="seconds for one model build or one row")
    parser.add_argument("--time-limit", type=float, default=480,
                        help="seconds from the start after which no row starts (a device call has 600)")
    args = parser.parse_args()
    rows = selected_rows(args.rows)
    bench = Bench(args)
    clock = Clock(args.row_timeout, args.time_limit)

    copy = copy_bandwidth()
    matmul_size = 8192 if tp_zoo.parallel.on_gpu() else 1024
    matmul = matmul_rate(matmul_size)
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s; bf16 {matmul_size}^3 product {matmul / 1e12:.1f} TFLOP/s",
          flush=True)

    plan, impossible = jobs(bench, rows, args.tp, args.skip_keras_hub)
    available = len(jax.devices())
    for job in plan:
        for cell in job.cells:
            if cell.tp * cell.dp > available:
                cell.note = f"not run (needs {cell.tp * cell.dp} devices)"
    for job in plan:
        run_job(job, clock)
        keras.backend.clear_session()
        jax.clear_caches()
        gc.collect()
    for directory in bench.temporary_folders:
        shutil.rmtree(directory, ignore_errors=True)

    cells = sorted([c for job in plan for c in job.cells] + impossible, key=table_order)
    print()
    print(header(
        f"tp scaling, {DTYPE}{', --small (every shape tiny, contexts / 16)' if args.small else ''}; floors at "
        f"{args.bandwidth / 1e12:.2f} TB/s (bench_decode.py's; this run's device copy {copy / 1e12:.2f}) and "
        f"{args.peak / 1e12:.0f} TFLOP/s (a large bf16 matmul on an H200; this run's {matmul_size}^3 product "
        f"{matmul / 1e12:.1f}); {time.monotonic() - START:.0f} s"))
    print_table(cells, bench)


if __name__ == "__main__":
    main()
