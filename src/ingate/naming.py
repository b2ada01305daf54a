"""Name conversions shared by config loaders."""

from __future__ import annotations

import re

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def camel_to_snake(name: str) -> str:
    """`queueMargin` -> `queue_margin` (snake_case input is returned unchanged): YAML keys are
    camelCase, the dataclasses they configure are snake_case."""
    return _CAMEL.sub("_", name).lower()
