"""Few-shot sampling: k examples per class, seeded and independent of the dataset's order of access."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence


def few_shot_indices(labels: Sequence[int], shots: int | None, seed: int) -> list[int]:
    """Indices of ``shots`` examples per class (all of a class that has fewer; all data if ``shots``
    is None). The same labels, shots and seed always give the same indices."""
    if shots is None:
        return list(range(len(labels)))
    if shots < 1:
        raise ValueError(f"shots must be >= 1 (or None for all data), got {shots}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        chosen.extend(indices if len(indices) <= shots else rng.sample(indices, shots))
    return sorted(chosen)
