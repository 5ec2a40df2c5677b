"""On/off environment switches, read one way everywhere.

A switch is on when set to anything but "", "0", "false", "no" or "off" (any case);
mergekit_timber_hook.pth reads MERGEKIT_TIMBER_NO_HOOK by the same rule.
"""

from __future__ import annotations

import os

_OFF = ("", "0", "false", "no", "off")


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _OFF
