"""A digest of what a category's splits hold, so that results computed on other data are not mixed with these.

`datasets` fingerprints a dataset by how it was built (for `Dataset.from_dict` of image paths: the paths), not by what
the files hold now: a category whose images or masks were replaced in place (a fixed mask, a re-extracted archive)
keeps its fingerprint. This digest reads the bytes.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json

import datasets

DIGEST_LENGTH = 16
"""Hex digits kept of the SHA-256 (as for the model's weights digest)."""
_ROWS_PER_BATCH = 256


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _canonical(value, where: str):
    """`value` as Arrow stores it, made JSON-serialisable and independent of where files are: an image (a
    `{"bytes", "path"}` struct, at any depth) becomes the SHA-256 of its bytes, embedded or in its file."""
    if isinstance(value, dict):
        if set(value) == {"bytes", "path"}:
            if value["bytes"] is not None:
                return {"sha256": hashlib.sha256(value["bytes"]).hexdigest()}
            if value["path"] is not None:
                try:
                    return {"sha256": _file_digest(value["path"])}
                except OSError as error:
                    raise FileNotFoundError(
                        f"{where}: cannot read {value['path']!r} ({error.strerror or error})."
                    ) from None
            raise ValueError(f"{where}: an image with neither bytes nor a path.")
        return {key: _canonical(item, where) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item, where) for item in value]
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime.date, datetime.time)):  # (datetime is a date)
        return {type(value).__name__: value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {"timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"decimal": str(value)}
    # (anything else is refused rather than written by repr, which may hold a memory address)
    raise TypeError(f"{where}: a value of type {type(value).__name__} the data digest cannot read.")


def splits_digest(splits: datasets.DatasetDict, name: str = "dataset") -> str:
    """SHA-256 (first 16 hex digits) over every split of `splits`: its name, length and features, then every example
    in order as Arrow stores it (nothing is decoded), images at any depth by the bytes of their files or their
    embedded bytes. Two `DatasetDict`s get the same digest exactly when they hold the same examples in the same order,
    wherever their files are, in every process.

    Raises:
        `FileNotFoundError`: an image file the split names cannot be read (`name` and the example are named).
    """
    digest = hashlib.sha256()
    for split_name in sorted(splits):
        split = splits[split_name]
        header = {"split": split_name, "rows": len(split), "features": split.features.to_dict()}
        digest.update(json.dumps(header, sort_keys=True).encode() + b"\n")
        index = 0
        for table in split.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH):
            for row in table.to_pylist():
                example = _canonical(row, f"{name} {split_name} example {index}")
                digest.update(json.dumps(example, sort_keys=True).encode() + b"\n")
                index += 1
    return digest.hexdigest()[:DIGEST_LENGTH]
