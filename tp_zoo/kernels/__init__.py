"""Pallas GPU kernels for the bandwidth-bound steps of decoding: each with
the XLA path beside it (in the layers) that runs wherever it does not apply."""
