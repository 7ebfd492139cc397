"""Real-task benchmark material for the merge engine: four text-classification tasks
built from labelled data shipped inside PyPI packages, and one LoRA adapter plus a
linear head per task trained on all-MiniLM-L6-v2 (see ``tasks``, ``train``, ``evaluate``).

Not installed with the project: run it from the repository root, e.g.
``python -m benchmarks.train --out /tmp/bench-adapters``.
"""
