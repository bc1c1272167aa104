"""Finding, streaming and exporting checkpoints."""

from tp_zoo.checkpoint.from_preset import from_preset
from tp_zoo.checkpoint.source import list_presets
