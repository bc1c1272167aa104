"""The errors tp_zoo raises for problems a user can fix, one class per kind.

Each is a ValueError, so code that catches bad input broadly still does.
"""


class UnsupportedConfigError(ValueError):
    """A checkpoint's config.json asks for something tp_zoo does not implement
    (an architecture, an activation, a rope type...)."""


class WrongFamilyError(ValueError):
    """A family's class was asked to load a checkpoint of another family."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: a tensor missing or of another
    shape, or a training state saved from a different model."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or its header is unreadable."""


class ShardingError(ValueError):
    """A size cannot be split over the requested tensor-parallel degree."""


class DeviceMemoryError(ValueError):
    """A request that would not fit in the devices' memory; the message gives
    the estimate of bytes needed and what is free."""


class ChatTemplateError(ValueError):
    """A chat template that is missing, does not compile, or fails on (or
    refuses) a conversation; the message names the problem."""
