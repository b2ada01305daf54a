"""Scheduling plugins, one module per family. Importing the package registers the built-in ones
(see `registry`)."""

from ingate.scheduling.plugins import (
    latency,
    load,
    lora,
    pickers,
    precise_prefix,
    prefix,
    registry,
    sizeband,
    slo,
)

__all__ = ["latency", "load", "lora", "pickers", "precise_prefix", "prefix", "registry", "sizeband", "slo"]
