"""What a merge device may be called: one definition, for the config (read by the daemon,
which never imports torch) and for the engine (which then checks the device exists)."""

from __future__ import annotations

import re


def check_device(name: str) -> str:
    """``name`` if it is a device the README documents (cpu, cuda, cuda:N), else ValueError:
    a typo in the config is found when it is read, not when every merge fails."""
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", name):
        raise ValueError(f"unknown device {name!r} (use cpu, cuda or cuda:N)")
    return name
