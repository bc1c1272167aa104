"""tp_zoo: Hugging Face LLMs as tensor-parallel KerasHub models on JAX."""

import contextlib
import os
import re
import sys
import tempfile

# tp_zoo is built on JAX collectives; choose the backend unless the user did
# (which only counts before keras is first imported: checked below).
_KERAS_IMPORTED_FIRST = "keras" in sys.modules
os.environ.setdefault("KERAS_BACKEND", "jax")

# An absl-format log line ("I0000 00:00:1795599008.895946   13230 port.cc:153] ...").
_ABSL_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_ABSL_PRE_INIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def _tensorflow_start_up_filtered():
    """Drops the C++ log lines TensorFlow writes to stderr while it is imported.

    keras_hub imports TensorFlow, which logs start-up lines (oneDNN, CUDA
    drivers) that say nothing about tp_zoo. TensorFlow 2.21 logs them
    through absl before it reads TF_CPP_MIN_LOG_LEVEL, so the variable alone
    does not silence them: the import runs with stderr (the file descriptor,
    where C++ writes) captured, and what is written is passed on less the
    lines below TF_CPP_MIN_LOG_LEVEL (default here 3: all but FATAL;
    TF_CPP_MIN_LOG_LEVEL=0 shows them all).
    """
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
    level = int(level) if level.isdigit() else 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                record = _ABSL_LINE.match(line)
                if line.startswith(_ABSL_PRE_INIT):
                    dropped = level > 0
                else:
                    dropped = record is not None and "IWEF".index(record[1]) < level
                if not dropped:
                    sys.stderr.write(line)


with _tensorflow_start_up_filtered():
    import keras  # noqa: E402

    # Keras picks its backend once, when first imported: a keras imported
    # before tp_zoo without KERAS_BACKEND runs on TensorFlow (its default),
    # where tp_zoo's layers would fail deep inside a model build.
    if keras.backend.backend() != "jax":
        why = "keras was imported before tp_zoo" if _KERAS_IMPORTED_FIRST else (
            f"KERAS_BACKEND={os.environ['KERAS_BACKEND']}")
        raise ImportError(f"tp_zoo needs Keras' JAX backend, but Keras has chosen {keras.backend.backend()!r} "
                          f"({why}): set KERAS_BACKEND=jax before importing keras.")
    import keras_hub  # noqa: E402, F401  (imports TensorFlow)

from tp_zoo import errors  # noqa: E402
from tp_zoo import layers  # noqa: E402
from tp_zoo import losses  # noqa: E402
from tp_zoo.checkpoint import from_preset  # noqa: E402
from tp_zoo.checkpoint import list_presets  # noqa: E402
from tp_zoo.parallel import distribution  # noqa: E402
from tp_zoo.parallel import initialize  # noqa: E402

__version__ = "0.1.0"
