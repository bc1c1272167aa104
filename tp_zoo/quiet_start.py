"""Hides the log lines TensorFlow writes to stderr while it is imported.

keras_hub imports TensorFlow, which logs start-up lines (oneDNN, CUDA
drivers) that say nothing about tp_zoo. TensorFlow 2.21 logs them through
absl before it reads TF_CPP_MIN_LOG_LEVEL, so the variable alone does not
silence them. Capturing a process's stderr is the application's call, not
a library's: the `tp-zoo` command does it; Python users of tp_zoo see the
lines once, when keras_hub is first imported.
"""

import contextlib
import os
import re
import sys
import tempfile

# An absl-format log line ("I0000 00:00:1795599008.895946   13230 port.cc:153] ...").
_ABSL_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_ABSL_PRE_INIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def tensorflow_logs_filtered():
    """Runs the block with stderr (the file descriptor, where C++ writes)
    captured, and passes on what was written less the log lines below
    TF_CPP_MIN_LOG_LEVEL (default 3: all but FATAL; 0 shows them all)."""
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
                if not _dropped(line, level):
                    sys.stderr.write(line)


def _dropped(line, level):
    if line.startswith(_ABSL_PRE_INIT):
        return level > 0
    record = _ABSL_LINE.match(line)
    return record is not None and "IWEF".index(record[1]) < level


def import_keras_hub_quietly():
    """Imports keras_hub (and so TensorFlow) with its start-up lines filtered."""
    with tensorflow_logs_filtered():
        import keras_hub  # noqa: F401
