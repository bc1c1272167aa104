"""tp_zoo: Hugging Face LLMs as tensor-parallel KerasHub models on JAX."""

from tp_zoo import layers
from tp_zoo import losses
from tp_zoo.parallel import distribution

__version__ = "0.1.0"
