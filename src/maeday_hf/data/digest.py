"""A digest of what a category's splits hold, so that results computed on other data are not mixed with these.

`datasets` fingerprints a dataset by how it was built (for `Dataset.from_dict` of image paths: the paths), not by what
the files hold now: a category whose images or masks were replaced in place (a fixed mask, a re-extracted archive)
keeps its fingerprint. This digest reads the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os

import datasets

DIGEST_LENGTH = 16
"""Hex digits kept of the SHA-256 (as for the model's weights digest)."""
_CHUNK = 1 << 20


def _update_with_bytes(digest, content: bytes) -> None:
    digest.update(len(content).to_bytes(8, "little"))
    digest.update(content)


def _update_with_file(digest, path: str) -> None:
    digest.update(os.path.getsize(path).to_bytes(8, "little"))
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


def _update_with_image(digest, value: dict | None, where: str) -> None:
    if value is None:
        digest.update(b"\x00")
    elif value.get("bytes") is not None:  # (the same content embedded or in a file: the same digest)
        digest.update(b"\x01")
        _update_with_bytes(digest, value["bytes"])
    elif value.get("path") is not None:
        digest.update(b"\x01")
        try:
            _update_with_file(digest, value["path"])
        except OSError as error:
            raise FileNotFoundError(f"{where}: cannot read {value['path']!r} ({error.strerror or error}).") from None
    else:
        raise ValueError(f"{where}: an image with neither bytes nor a path.")


def splits_digest(splits: datasets.DatasetDict, name: str = "dataset") -> str:
    """SHA-256 (first 16 hex digits) over every split of `splits`: its name, length and features, then every example
    in order, image columns by the bytes of their files (or embedded bytes), the other columns by value. Two
    `DatasetDict`s get the same digest exactly when they hold the same examples in the same order, wherever their
    files are.

    Raises:
        `FileNotFoundError`: an image file the split names cannot be read (`name` and the example are named).
    """
    digest = hashlib.sha256()
    for split_name in sorted(splits):
        split = splits[split_name]
        features = split.features
        header = {"split": split_name, "rows": len(split), "features": features.to_dict()}
        _update_with_bytes(digest, json.dumps(header, sort_keys=True).encode())
        image_columns = sorted(column for column, feature in features.items() if isinstance(feature, datasets.Image))
        other_columns = sorted(column for column in features if column not in image_columns)
        undecoded = split
        for column in image_columns:
            undecoded = undecoded.cast_column(column, datasets.Image(decode=False))
        for index, example in enumerate(undecoded):
            for column in image_columns:
                _update_with_image(digest, example[column], f"{name} {split_name} example {index} ({column})")
            values = {column: example[column] for column in other_columns}
            _update_with_bytes(digest, json.dumps(values, sort_keys=True, default=repr).encode())
    return digest.hexdigest()[:DIGEST_LENGTH]
