"""Names the wire format shares between trainers and the service (no dependencies).

An upload's tensor is named ``param`` (the whole flattened parameter) or ``param@offset`` (a
flat slice starting at ``offset``; math.md §7: partial sketches add up, so slices may be sent
separately).  The applied-update row travels as an ordinary row under a reserved sequence id.
Both ``clients/`` and ``service/`` import these, so this module imports nothing heavy.
"""

from __future__ import annotations

import re

APPLIED_UPDATE_ID = "__applied_update__"
"""Reserved sequence id of the applied-update row ``u = theta_after - theta_before`` (math.md)."""

_SLICE = re.compile(r"^(?P<name>.+)@(?P<offset>\d+)$")


def parse_tensor_name(key: str) -> tuple[str, int]:
    """Split an upload's tensor name ``param`` or ``param@offset`` into ``(param, offset)``."""
    match = _SLICE.match(key)
    if match is None:
        return key, 0
    return match.group("name"), int(match.group("offset"))


def slice_name(param: str, offset: int) -> str:
    """The tensor name of the flat slice of ``param`` that starts at ``offset``."""
    return f"{param}@{offset}"
