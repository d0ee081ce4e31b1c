"""Deterministic k-shot selection: the same (split, k, seed) gives the same shots on every machine and library version.

The protocol compares methods on identical shots (paper, Sec. 4: "the same exact shots are used by all methods"), so the
choice must not depend on global RNG state or on NumPy's generator streams. Each example index is ranked by a SHA-256
hash of `(seed, index)` and the k lowest are taken. A side effect worth having: for one seed, the k-shot set
contains the (k-1)-shot set, so a 0-4 shot curve adds one image at a time.
"""

from __future__ import annotations

import hashlib
import numbers

import datasets


def _rank(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"maeday-shots:{seed}:{index}".encode()).digest()


def shot_indices(num_examples: int, k: int, seed: int) -> list[int]:
    """Indices of the k shots among `num_examples`, in selection order (the first `k - 1` are the (k-1)-shot set).

    Raises:
        `TypeError`: `k` or `seed` is no integer (`True`, `2.0` and `None` are refused, not read as some seed).
        `ValueError`: `k < 1` or `k > num_examples`.
    """
    for name, value in (("k", k), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    k, seed = int(k), int(seed)  # (a NumPy integer ranks as the same int)
    if k < 1:
        raise ValueError(f"k must be >= 1 shot, got {k}; zero-shot runs use no training split at all.")
    if k > num_examples:
        raise ValueError(f"Cannot pick k={k} shots from a split of {num_examples} examples.")
    return sorted(range(num_examples), key=lambda index: _rank(seed, index))[:k]


def select_shots(train_split: datasets.Dataset, k: int, seed: int) -> datasets.Dataset:
    """The k training examples used as shots for `seed`.

    Args:
        train_split (`datasets.Dataset`): The category's good training images (e.g. `load_mvtec(...)["train"]`).
        k (`int`): Number of shots, `1 <= k <= len(train_split)`.
        seed (`int`): Shot seed; the protocol uses seeds `0, 1, 2` for its three runs.

    Returns:
        `datasets.Dataset` of length `k`, a view of `train_split` (rows in selection order).

    Example:

    ```python
    >>> from maeday_hf.data import select_shots
    >>> shots = select_shots(bottle["train"], k=2, seed=0)
    >>> len(shots)
    2
    ```
    """
    if not isinstance(train_split, datasets.Dataset):
        raise TypeError(f"train_split must be a datasets.Dataset, got {type(train_split).__name__}.")
    return train_split.select(shot_indices(len(train_split), k, seed))
