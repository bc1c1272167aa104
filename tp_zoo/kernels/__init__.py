"""Pallas GPU kernels for the bandwidth-bound steps of decoding: each with
the XLA path beside it (in the layers) that runs wherever it does not apply.

Each runs with the configuration in force (`configuration`): its defaults,
or a `configured(KernelConfigs(...))` block's."""

from tp_zoo.kernels.configuration import DecodeAttentionConfig
from tp_zoo.kernels.configuration import Int8MatmulConfig
from tp_zoo.kernels.configuration import KernelConfigs
from tp_zoo.kernels.configuration import PagedAttentionConfig
from tp_zoo.kernels.configuration import active
from tp_zoo.kernels.configuration import configured
