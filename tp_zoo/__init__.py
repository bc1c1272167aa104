"""tp_zoo: Hugging Face LLMs as tensor-parallel KerasHub models on JAX."""

import os

# tp_zoo is built on JAX collectives; choose the backend unless the user did.
os.environ.setdefault("KERAS_BACKEND", "jax")

from tp_zoo import errors  # noqa: E402
from tp_zoo import layers  # noqa: E402
from tp_zoo import losses  # noqa: E402
from tp_zoo.checkpoint import from_preset  # noqa: E402
from tp_zoo.checkpoint import list_presets  # noqa: E402
from tp_zoo.parallel import distribution  # noqa: E402
from tp_zoo.parallel import initialize  # noqa: E402

__version__ = "0.1.0"
