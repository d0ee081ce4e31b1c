"""Turn whatever a user passes (path, URL, PIL image, NumPy array) into an upright 8-bit RGB PIL image.

`transformers.image_utils.load_image` covers URLs and plain files but calls `convert("RGB")` on everything, which clips
16-bit images (MVTec's and many industrial cameras' PNGs) to white, and it accepts no arrays. Here 16-bit and 32-bit
integer images are rescaled from their full range, float arrays are read as [0, 1], alpha is dropped, and palette,
grayscale and CMYK images are converted; files and URLs are decoded the same way (a URL's HTTP status is checked).
"""

from __future__ import annotations

import io
import os
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""File suffixes treated as images when a folder is searched (CLI, shots, dataset builders)."""

_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_HALF_STEP = 0.5 / 255  # float pixel values within half an 8-bit step of [0, 1] round as the clipped value would
_FLOAT_OVERSHOOT = 1.0  # a float array beyond [0, 1] by more than this is not a [0, 1] image (a resize overshoots less)


def is_url(text: str) -> bool:
    """An http(s) URL (the scheme in any case, as URLs allow)."""
    return text[:8].lower().startswith(("http://", "https://"))


def _decode(source: str | os.PathLike | io.BytesIO, name: str, pixels: bool = True) -> Image.Image | None:
    """The image at `source`, decoded now (so a truncated file fails here and not later); with `pixels=False` only
    its header is read and nothing is returned. Errors name `name`."""
    try:
        with Image.open(source) as image:
            if not pixels:
                return None
            image.load()
            return image.copy()
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"Cannot read {name!r}: {error} To read larger images, raise PIL.Image.MAX_IMAGE_PIXELS (on the "
            f"command line: --max-image-pixels)."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        # (PIL names an in-memory source by its repr, "<_io.BytesIO object at 0x...>": `name` says it already)
        message = str(error).replace(f" {source!r}", "") if isinstance(source, io.BytesIO) else str(error)
        raise ValueError(f"Cannot read {name!r} as an image: {message}") from None


def check_image_file(path: str | os.PathLike) -> None:
    """Read an image file's header only (fast: no pixels are decoded), so a file that is not an image at all (empty,
    another format, an HTML page saved as .png, too large) fails before any work starts. A file damaged after its
    header is found only when decoded.

    Raises:
        FileNotFoundError, ValueError: as `load_rgb_image` would for that file.
    """
    _open_image_file(path, pixels=False)


def _open_image_file(path: str | os.PathLike, pixels: bool = True) -> Image.Image | None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file not found: {os.fspath(path)!r}.")
    if os.path.isdir(path):
        raise ValueError(f"Expected an image file, got the directory {os.fspath(path)!r}.")
    return _decode(path, os.fspath(path), pixels)


_LONGEST_SOCKET_WAIT = 86400.0


def redact_url(url: str) -> str:
    """`url` without a `user:password@` (for messages and listings that get shared; the query stays)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # (malformed: shown as given)
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def download(url: str, timeout: float | None = None) -> bytes:
    """GET `url` (redirects followed) and return its body. `timeout` (seconds) bounds the whole download, not only each
    wait for bytes (a server trickling a byte at a time would pass that); None waits as long as it takes, as
    `load_image` does.

    Raises:
        ValueError: an HTTP error status, a malformed URL, a timeout that is not > 0.
        OSError: no connection, or not downloaded within `timeout`.
    """
    from huggingface_hub.utils import httpx  # the HTTP client transformers fetches images with, whatever its version

    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (or None), got {timeout!r}.")
    shown = redact_url(url)  # (errors end up in logs)
    deadline = None if timeout is None else time.monotonic() + timeout
    # Each wait for bytes is bounded by the timeout too, but by at most a day: sockets take no longer (inf or 1e10
    # overflow their clock); the deadline still bounds the whole download.
    wait = None if timeout is None else min(timeout, _LONGEST_SOCKET_WAIT)
    body = io.BytesIO()
    try:
        with httpx.stream("GET", url, timeout=wait, follow_redirects=True) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                body.write(chunk)
                if deadline is not None and time.monotonic() > deadline:
                    raise OSError(f"Cannot fetch image URL {shown!r}: not downloaded within timeout={timeout} s.")
    except httpx.HTTPStatusError as error:
        status = error.response
        raise ValueError(f"Cannot read image URL {shown!r}: HTTP {status.status_code} {status.reason_phrase}.") from None
    except httpx.HTTPError as error:
        raise OSError(f"Cannot fetch image URL {shown!r}: {str(error) or type(error).__name__}.") from None
    except (httpx.InvalidURL, ValueError) as error:  # (a malformed URL: a bad IPv6 literal, an unencodable host, ...)
        raise ValueError(f"Cannot fetch image URL {shown!r}: it is not a valid URL ({error}).") from None
    return body.getvalue()


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an image file's bytes (`name` says where they came from, in errors). Raises `ValueError` if they are not
    a readable image."""
    return _decode(io.BytesIO(data), name)


def _fetch_image(url: str, timeout: float | None) -> Image.Image:
    return decode_image_bytes(download(url, timeout), url)


def array_to_rgb_image(array: np.ndarray) -> Image.Image:
    """`(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)` array -> RGB PIL image.

    uint8 is used as is, uint16 is rescaled from [0, 65535] (either byte order), bool to {0, 255}, floats are taken
    as [0, 1] and clipped to it (a resize's overshoot), but values more than 1 beyond it (0..255 values, which would
    turn white), NaN or infinite ones are refused.
    """
    if not array.dtype.isnative:  # e.g. big-endian 16-bit, as NumPy reads Pillow's "I;16B"
        array = array.astype(array.dtype.newbyteorder("="))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}."
        )
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(
                f"Expected finite values in a float image array, got {np.count_nonzero(~np.isfinite(array))} NaN or "
                f"infinite value(s) in an array of shape {array.shape}."
            )
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if low < -_FLOAT_OVERSHOOT or high > 1.0 + _FLOAT_OVERSHOOT:
            raise ValueError(
                f"Expected float image values in [0, 1], got values from {low:g} to {high:g}"
                f"{'; for 0..255 values pass a uint8 array (array.astype(np.uint8))' if high <= 255.5 else ''}."
            )
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"Expected a uint8, uint16, bool or float image array, got dtype {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def _scaled_to_rgb(values: np.ndarray, full_scale: float, mode: str) -> Image.Image:
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low < -_FLOAT_OVERSHOOT * full_scale or high > full_scale * (1.0 + _FLOAT_OVERSHOOT):
        raise ValueError(
            f"Expected a mode {mode} image with values in [0, {full_scale:g}], got values from {low:g} to {high:g}."
        )
    return array_to_rgb_image((values / full_scale).astype(np.float32))


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB version of any PIL image (EXIF orientation applied, 16-bit rescaled, alpha dropped).

    An image that already is upright RGB is returned as it is: nothing in this package writes to it, and two copies
    of a 1024 x 1024 image cost 3.5 ms, as much as the model's time per image on a GPU.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        # "I;16*" is 16-bit (16-bit PNG and TIFF files). "I" holds either: 16-bit values (`.convert("I")` of such a
        # file) or 8-bit ones (`Image.fromarray` of int32, `.convert("I")` of an "L" image); it is read as 16-bit if
        # a value exceeds 255 (so a 16-bit image with no value above 255, nearly black, reads as 8-bit).
        values = np.asarray(image, dtype=np.float64)
        sixteen_bit = image.mode.startswith("I;16") or float(values.max(initial=0.0)) > 255
        return _scaled_to_rgb(values, 65535.0 if sixteen_bit else 255.0, image.mode)
    if image.mode == "F":
        # Floats in [0, 1] (`Image.fromarray` of a float array, as `datasets` stores one), or 0..255 (Pillow's scale
        # for F, as its `convert("F")` gives and its `convert("L")` reads).
        values = np.asarray(image, dtype=np.float64)
        return _scaled_to_rgb(values, 1.0 if float(values.max(initial=0.0)) <= 1.0 + _HALF_STEP else 255.0, "F")
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        image = image.convert("LA")
    return image.convert("RGB")


def load_rgb_image(image: str | os.PathLike | Image.Image | np.ndarray, timeout: float | None = None) -> Image.Image:
    """Load a path, URL, PIL image or NumPy array as an 8-bit RGB PIL image.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file or URL that is not a readable image (or an HTTP error status), or an array of an
            unsupported shape/dtype.
        OSError: a URL that cannot be fetched (no connection, timeout).
        TypeError: anything else.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return array_to_rgb_image(image)
    if isinstance(image, str) and is_url(image):
        return to_rgb(_fetch_image(image, timeout))
    if isinstance(image, (str, os.PathLike)):
        return to_rgb(_open_image_file(image))
    raise TypeError(
        f"Expected an image path, URL, PIL.Image.Image or numpy.ndarray, got {type(image).__name__}: "
        f"{' '.join(repr(image).split()):.80}."
    )


def is_single_image(images) -> bool:
    """Whether `images` is one image (path, URL, PIL image, `(H, W)` or `(H, W, C)` array) rather than several."""
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return isinstance(images, (str, os.PathLike, Image.Image))


def as_image_list(images) -> list:
    """A single image (see `is_single_image`) -> `[image]`; an `(N, H, W, C)` array or any iterable of images -> a
    list of them. (Iterating a single image would split it into a path's characters or an array's rows.)"""
    return [images] if is_single_image(images) else list(images)


def is_hidden(path: Path) -> bool:
    """Names starting with `.`: macOS AppleDouble files (`._000.png`, image suffix but no image), `.DS_Store`,
    `.ipynb_checkpoints`, a killed writer's `.x.partial-*` folder."""
    return path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (so example order, and thus shot selection, is reproducible),
    hidden files left out; a broken symbolic link with an image suffix raises FileNotFoundError."""
    images = sorted(
        path for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(path) and (path.is_file() or path.is_symlink())
    )
    for path in images:
        if not path.exists():  # a link to nothing (a partly synced folder): the image must not drop out unnoticed
            raise FileNotFoundError(f"{path} is a broken symbolic link: {os.readlink(path)!r} does not exist.")
    return [path for path in images if path.is_file()]
