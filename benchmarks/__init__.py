"""Real-task benchmark material for the merge engine: four text-classification tasks
built from labelled data shipped inside PyPI packages, and one LoRA adapter plus a
linear head per task trained on all-MiniLM-L6-v2 (see ``tasks``, ``train``, ``evaluate``).

Not installed with the project: run it from the repository root, e.g.
``python -m benchmarks.train --out /tmp/bench-adapters``.
"""

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # scoring loads the encoder many times; our own bars say enough
