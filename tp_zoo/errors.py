"""The errors tp_zoo raises for problems a user can fix."""


class DeviceMemoryError(ValueError):
    """A request that would not fit in the devices' memory; the message gives
    the estimate of bytes needed and what is free."""
