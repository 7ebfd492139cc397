"""iteris-daemon: merge many task LoRA adapters into one with IterIS (CVPR 2025)."""

from .hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
