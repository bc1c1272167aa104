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
    shape, or a training state saved from a different model (or with LoRA of
    another rank)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or unreadable: a safetensors header, a
    config.json that is not a JSON object."""


class CheckpointNotFoundError(ValueError):
    """No checkpoint where a name points: an unknown preset, a directory
    without config.json, a Hugging Face repo that does not exist (or is
    private to the token used)."""


class GatedCheckpointError(ValueError):
    """A gated Hugging Face repo, asked for without a token of an account
    that has accepted its license."""


class HubUnreachableError(ValueError):
    """The Hugging Face Hub could not serve a checkpoint (no network,
    HF_HUB_OFFLINE, an error of the Hub) and the local cache has no copy."""


class ShardingError(ValueError):
    """A size cannot be split over the requested tensor-parallel degree."""


class DeviceMemoryError(ValueError):
    """A request that would not fit in the devices' memory; the message gives
    the estimate of bytes needed and what is free."""


class ChatTemplateError(ValueError):
    """A chat template that is missing, does not compile, or fails on (or
    refuses) a conversation; the message names the problem."""


class DataFileError(ValueError):
    """A fine-tuning data file that is missing, unreadable or not in its
    format (.txt, or .jsonl of {"text": ...} objects)."""


class FinetuneSettingsError(ValueError):
    """Fine-tuning settings that cannot run, refused before the model loads:
    a count below 1, a learning rate that is not a positive number, an
    output folder that is a file or cannot be written."""


class RequestError(ValueError):
    """A generation request the server or engine cannot take: a field out of
    range or of the wrong type, a prompt beyond the model's positions.
    `param` names the field (OpenAI's error object carries it)."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


class QueueFullError(ValueError):
    """The engine's queue of waiting requests is full; `retry_after` is a
    suggested wait in seconds (a server answers 429 with it)."""

    def __init__(self, message, retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after
