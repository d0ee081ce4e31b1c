"""The `maeday` command: `maeday detect ...`, `maeday synthetic ...`, `maeday finetune ...`.

Errors in the user's input end the command with one line on stderr (`maeday: error: ...`) and exit status 2, never a
traceback. Every file is written to a temporary name and renamed into place, so no output is ever half-written.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import gc
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import urllib.parse
import warnings
import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic_io import (
    folders_removed_on_failure,
    let_go,
    make_held_partial_dir,
    make_held_partial_file,
    remove_abandoned,
    replace_folder,
)
from .images import IMAGE_SUFFIXES, is_url, redact_url
from .masking import MASK_SCHEDULES
from .overlap import prefetch
from .pipeline import DEFAULT_CHECKPOINT, DEFAULT_MASK_RATIO, DEFAULT_NUM_MASKS
from .step_loop import GraphCaptureError

logger = logging.getLogger("maeday_hf")

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError, GraphCaptureError)


class CommandError(Exception):
    """An error in the user's input, printed as one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a batch scheduler, `docker stop`), raised like Ctrl-C's `KeyboardInterrupt` so the
    same clean-up runs: temporary files and unfinished outputs are removed, finished outputs are left as they were."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """While active (in the main thread), SIGTERM raises `Terminated` instead of ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        # A SIGTERM while the clean-up of an earlier one runs (a scheduler repeating itself) does not cut it short;
        # SIGKILL still would. One that finds no Terminated on its way (the first was raised inside a finaliser,
        # where Python drops exceptions) raises again: ignoring every later SIGTERM would leave a process no signal
        # but SIGKILL stops.
        if not _terminated_is_being_handled():
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated_is_being_handled() -> bool:
    """Whether a `Terminated` is what the interrupted code is handling (a `finally`, an `except`, an `__exit__`),
    or the context of what it is handling."""
    error = sys.exc_info()[1]
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Terminated):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


def interrupted_status(error: KeyboardInterrupt) -> int:
    """The exit status of an interrupted command: 143 for SIGTERM, 130 for Ctrl-C (128 + the signal, as shells give)."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)


def how_stopped(error: KeyboardInterrupt) -> str:
    """What the command tells the user it was: "terminated" (SIGTERM) or "interrupted" (Ctrl-C)."""
    return "terminated" if isinstance(error, Terminated) else "interrupted"


def collect_images(inputs: Sequence[str], exclude: str | os.PathLike | None = None) -> list[tuple[Path | str, str]]:
    """Expand files, folders (recursively) and image URLs into `(path or URL, output name)` pairs, names unique.

    Names are paths relative to the local inputs' common folder, `__` for separators: `maeday detect data/*/test`
    names `data/wood/test/crack/000.png` `wood__test__crack__000` (MVTec has `test/good/000.png` and
    `test/crack/000.png`); a URL is named by its file name (`https://host/a/b%20c.png?x=1` -> `b_c`). A folder's
    images come sorted. In folders, hidden files and folders (`.name`: macOS `._x.png` resource forks,
    `.ipynb_checkpoints`) and anything under `exclude` (the heatmaps folder, so a second run does not score the
    first one's heatmaps) are skipped.
    """
    excluded = Path(os.path.realpath(exclude)) if exclude is not None else None

    def is_excluded(path: Path) -> bool:
        return excluded is not None and Path(os.path.realpath(path)).is_relative_to(excluded)

    found: list[Path | str] = []
    roots: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if is_url(entry):
            found.append(entry)
        elif path.is_dir():
            images = _folder_images(path, is_excluded)
            if not images:
                if is_excluded(path):
                    raise CommandError(f"folder {entry!r} is the heatmaps folder this run replaces, not images to "
                                       f"score; give the images' folder, or choose another --out")
                raise CommandError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in folder {entry!r}")
            found.extend(images)
            roots.append(path)
        elif path.is_file():
            found.append(path)
            roots.append(path.parent)
        elif path.exists():
            raise CommandError(f"input {entry!r} is neither a file nor a folder (a pipe or a device?)")
        else:
            raise CommandError(f"input {entry!r} does not exist (expected an image file or a folder of images)")
    common = Path(os.path.commonpath([os.path.abspath(root) for root in roots])) if roots else None

    def name_of(path: Path | str) -> str:
        if isinstance(path, str):
            return _url_name(path)
        parts = Path(os.path.abspath(path)).relative_to(common).with_suffix("").parts
        return _fitting_name(_portable_name("__".join(parts)))

    images = [(path, name_of(path)) for path in found]
    names = [name.casefold() for _, name in images]  # (A.png and a.png are one file on macOS and Windows)
    if len(set(names)) != len(names):
        # The same file given twice, or a.png next to a.jpg: a running index keeps names unique.
        images = [(path, f"{index:05d}_{name}") for index, (path, name) in enumerate(images)]
    return images


def _folder_images(folder: Path, is_excluded) -> list[Path]:
    """Image files under `folder`, sorted, following links to folders (each real folder once: a link loop ends),
    leaving out hidden files and folders and what `is_excluded`; a broken link with an image suffix is an error (the
    image must not drop out unnoticed)."""
    images = []
    visited = set()

    def unreadable(error: OSError) -> None:  # (os.walk skips a folder it cannot list, and its images with it)
        where = os.fspath(error.filename or folder)
        if os.path.realpath(where) == os.path.realpath(folder):
            raise CommandError(f"cannot read folder {where!r}: {error.strerror or error}")
        # A subfolder (a mount point's lost+found, a drive's System Volume Information): named, and the rest scored.
        logger.warning("Skipping folder %r, which cannot be read (%s): its images, if any, are not scored.", where,
                       error.strerror or error)

    for directory, subfolders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited or is_excluded(Path(directory)):
            subfolders[:] = []
            continue
        visited.add(real)
        # Real folders before links to folders (a stable sort: each group in name order), so a folder reached both
        # ways is named by its real path.
        subfolders[:] = sorted(
            sorted(name for name in subfolders if not name.startswith(".")),
            key=lambda name: os.path.islink(os.path.join(directory, name)),
        )
        for name in files:
            path = Path(directory) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not path.exists():
                raise CommandError(f"{os.fspath(path)!r} is a broken link: {os.readlink(path)!r} does not exist")
            if path.is_file() and not is_excluded(path):
                images.append(path)
    return sorted(images)


_NOT_IN_FILE_NAMES = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
"""What a file name may not hold on Windows (and so on a shared or FAT/NTFS/SMB --out): `<>:"/\|?*` and control
characters (a newline included)."""
_RESERVED_NAMES = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?", flags=re.IGNORECASE)


def _portable_name(name: str) -> str:
    """`name` with what a Windows file name cannot hold replaced by `_`: those characters, a trailing dot or space,
    and the device names (`CON`, `NUL`, `COM1`, ...)."""
    name = _NOT_IN_FILE_NAMES.sub("_", name)
    name = re.sub(r"[. ]+$", lambda found: "_" * len(found[0]), name)
    return f"_{name}" if _RESERVED_NAMES.fullmatch(name) else name


def _url_name(url: str) -> str:
    """A heatmap name for an image URL: its file name without suffix, characters a file name cannot hold replaced."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""  # (no user:password@, no port)
    except ValueError as error:  # (e.g. an unclosed IPv6 bracket)
        raise CommandError(f"input {url!r} is not a valid URL: {error}") from None
    stem = PurePosixPath(urllib.parse.unquote(parts.path)).stem
    name = re.sub(r"[^\w.-]+", "_", stem).strip("._") or re.sub(r"[^\w.-]+", "_", host).strip("._")
    return _fitting_name(name or "image")


def one_line_message(error: BaseException) -> str:
    """The first line of an error's message; for one re-raised from a DataLoader worker ("Caught ValueError in
    DataLoader worker process 0." + the worker's traceback), the worker's own message."""
    message = str(error)
    if "Original Traceback" in message:
        raised = re.findall(r"^\w+(?:Error|Exception|Interrupt): (.+)$", message, flags=re.MULTILINE)
        if raised:
            message = raised[-1]
    return message.splitlines()[0] if message else type(error).__name__


_HEATMAP_MEMORY_BUDGET = 2**30
"""Bytes the heatmap-drawing threads of `maeday detect` may hold at once (1 GiB: 8 threads for images of up to ~1.9
MP, 1 for 16 MP)."""

_MAX_NAME_BYTES = 200
"""Longest heatmap file name stem, in UTF-8 bytes: file systems take 255 per name, and `.png` plus a running index
must still fit."""


def _fitting_name(name: str) -> str:
    """`name`, or, if it is too long for a file name, its start and a hash of the whole (still unique)."""
    encoded = name.encode(errors="surrogateescape")  # (a file name that is not UTF-8 keeps its bytes)
    if len(encoded) <= _MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    start = encoded[: _MAX_NAME_BYTES - len(digest) - 2].decode(errors="ignore")  # whole characters only
    return f"{start}__{digest}"


def skip_the_final_collection_at_exit() -> None:
    """Freeze the heap at exit, so the interpreter's last garbage collections do not walk the ~370,000 objects that
    importing torch and transformers leaves (about 1 s of every command's exit on 2 CPU cores). Only for a command's
    own process (`as_program`): cyclic garbage left for those collections is then never finalised, which a command
    does not need (its files are closed and renamed by then), but a process that runs it in-process might."""
    global _FREEZE_REGISTERED
    if not _FREEZE_REGISTERED:
        atexit.register(gc.freeze)
        _FREEZE_REGISTERED = True


_FREEZE_REGISTERED = False


def as_program(main: Callable[[], int]) -> Callable[[], int]:
    """`main` as its console program (`[project.scripts]`, `python -m`, the scripts): the same, and its process skips
    the final garbage collection at exit (`skip_the_final_collection_at_exit`). `main(argv)` itself leaves its
    caller's process as it was."""
    def program() -> int:
        skip_the_final_collection_at_exit()
        return main()

    program.__doc__ = main.__doc__
    return program


def configure_logging(level: int, format: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Log records at `level` and up to stderr, once each: huggingface_hub prints its own through its own handler
    (and would print them a second time through the root's)."""
    logging.basicConfig(level=level, format=format)
    logging.getLogger("huggingface_hub").propagate = False


# --precision -> the `bf16` argument of the pipeline, FinetuneConfig and ProtocolConfig (None: the device decides).
BF16_OF_PRECISION = {"auto": None, "bf16": True, "fp32": False}


class _PathDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str]):
        self.paths = paths
        self._in_worker = False

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        if not self._in_worker and torch.utils.data.get_worker_info() is not None:
            # A DataLoader worker process. torch's own SIGTERM handler there exits quietly only when the signal comes
            # from the main process; from anyone else (`timeout`, Slurm or systemd signalling the whole process group)
            # the worker dies by it, and the main process then prints a traceback and leaves pymp-* folders. Raised
            # as KeyboardInterrupt instead, the worker loop ends normally (it expects the main process to stop too).
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
            self._in_worker = True
        return self.paths[index]


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_detect(args: argparse.Namespace) -> int:
    from .images import check_image_file, decode_image_bytes, download
    from .masking import validate_positive_int
    from .pipeline import split_call_parameters

    call_kwargs = dict(
        num_masks=args.num_masks,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        mask_schedule=args.mask_schedule,
        mask_batch_size=args.mask_batch_size,
        bf16=BF16_OF_PRECISION[args.precision],
    )
    if args.threshold is not None:
        call_kwargs["threshold"] = args.threshold
    split_call_parameters(**call_kwargs)  # bad options fail before the model loads
    if args.batch_size is not None:
        validate_positive_int(args.batch_size, "batch_size")
    if args.num_workers is not None and args.num_workers < 0:
        raise CommandError(f"--num-workers must be >= 0, got {args.num_workers}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"--out {args.out!r} is a file; expected a folder (created if missing)")
    writable = _nearest_existing(out_dir)
    if not writable.is_dir():
        raise CommandError(f"--out {args.out!r} cannot be created: {os.fspath(writable)!r} is a file")
    if not os.access(writable, os.W_OK | os.X_OK):  # (found now, not once the model has loaded)
        raise CommandError(f"--out {args.out!r} is not writable: {os.fspath(writable)!r} does not let this user "
                           f"create files in it; choose another --out")
    if (out_dir / "scores.csv").exists() and not (out_dir / "scores.csv").is_file():
        raise CommandError(f"{os.fspath(out_dir / 'scores.csv')!r} is not a file; the scores would have nowhere to go")
    _check_heatmaps_folder(out_dir / "heatmaps")  # (again when it is swapped out)
    images = collect_images(args.inputs, exclude=out_dir / "heatmaps")  # what a previous run wrote
    heatmaps_dir = Path(os.path.realpath(out_dir / "heatmaps"))  # (links resolved: the folder the swap replaces)
    inside = [
        path for path, _ in images if isinstance(path, Path) and Path(os.path.realpath(path)).is_relative_to(heatmaps_dir)
    ]
    if inside:
        raise CommandError(f"input {os.fspath(inside[0])!r} is in {os.fspath(out_dir / 'heatmaps')!r}, which this run "
                           f"replaces with its heatmaps; move the images or choose another --out")
    if not args.timeout > 0:
        raise CommandError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    with ExitStack() as cleanup:
        # Each URL is downloaded once, before the model loads (a bad URL fails fast), and then scored and drawn from
        # that copy; scores.csv lists the URL.
        downloads = None
        downloaded: dict[str, Path] = {}  # (a URL given twice is fetched once)
        sources = []
        for index, (path, _) in enumerate(images):
            if isinstance(path, str):
                if path not in downloaded:
                    if downloads is None:
                        downloads = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="maeday-urls-")))
                    data = download(path, args.timeout)
                    if not args.skip_unreadable:  # (else decoded with the files below, and left out if unreadable)
                        decode_image_bytes(data, redact_url(path))  # not an image: one line naming the URL, now
                    downloaded[path] = downloads / str(index)
                    downloaded[path].write_bytes(data)
                sources.append(downloaded[path])
            else:
                if not args.skip_unreadable:
                    check_image_file(path)  # (its header: not an image at all fails now, not after hours of scoring)
                sources.append(path)
        num_skipped = 0
        if args.skip_unreadable:
            num_images = len(images)
            images, sources = _readable_only(images, sources)
            num_skipped = num_images - len(images)
            if not images:
                raise CommandError(f"none of the {num_images} images could be read (each is named above)")
        with folders_removed_on_failure(out_dir):
            return _detect(args, call_kwargs, out_dir, images, sources, num_skipped)


def _readable_only(
    images: list[tuple[Path | str, str]], sources: list[Path]
) -> tuple[list[tuple[Path | str, str]], list[Path]]:
    """(`--skip-unreadable`) Every image decoded now, in threads, and those that cannot be read (damaged after their
    header, not an image at all) left out, each named in a warning (a URL by itself, not its downloaded copy)."""
    from .images import decode_image_bytes, load_rgb_image, to_rgb

    def error_of(item: tuple[Path | str, Path]) -> Exception | None:
        path, source = item
        try:
            if isinstance(path, str):  # a URL's downloaded copy, named by the URL
                to_rgb(decode_image_bytes(source.read_bytes(), redact_url(path)))
            else:
                load_rgb_image(source)
        except (ValueError, OSError) as error:  # (FileNotFoundError too: gone since it was listed)
            return error
        return None

    # As many threads as the cores and a memory budget allow (a decoded image and its RGB copy: up to ~16 bytes a
    # pixel), the largest image's size read from the headers.
    largest = max((_header_pixels(source) for source in sources), default=1)
    num_threads = max(1, min(8, os.cpu_count() or 1, _HEATMAP_MEMORY_BUDGET // (16 * max(1, largest))))
    kept_images, kept_sources = [], []
    errors = prefetch(zip((path for path, _ in images), sources), error_of, num_threads, lookahead=2 * num_threads)
    for (path, name), source, error in zip(images, sources, errors):
        if error is None:
            kept_images.append((path, name))
            kept_sources.append(source)
        else:
            logger.warning("Left out: %s", one_line_message(error))
    return kept_images, kept_sources


def _header_pixels(source: Path) -> int:
    """Width x height from an image file's header (0 where it has none that reads)."""
    from PIL import Image

    try:
        with Image.open(source) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - unreadable: found, and named, when decoded
        return 0


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a missing `path` would be created)."""
    path = Path(path).absolute()  # (`..` kept: after a link it is not the textual parent)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


_SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "@eadir", "$recycle.bin", "system volume information"})
"""What file browsers and NAS systems put in a folder that is looked at (matched case-insensitively)."""


def _written_by_the_system(name: str) -> bool:
    """Hidden entries (`.DS_Store`, `.AppleDouble/`, `.ipynb_checkpoints/`) and `_SYSTEM_NAMES` (`Thumbs.db`, ...)."""
    return name.startswith(".") or name.casefold() in _SYSTEM_NAMES


_HEATMAPS_SUBFOLDERS = {"maps": ".npy", "masks": ".png"}
"""What `--save-maps` adds to the heatmaps folder: subfolder -> the suffix of its files."""


def _check_heatmaps_folder(folder: Path, shown: Path | None = None) -> None:
    """Refuse to replace `folder` (shown to the user as `shown`) unless it is missing, a link (only the link is
    replaced), or looks like what `maeday detect` writes there: PNG heatmaps, `maps/*.npy`, `masks/*.png` (and what
    file browsers add: hidden entries, `Thumbs.db` and the like). This run replaces the folder whole; a file of the
    user's must not go with it."""
    shown = shown if shown is not None else folder
    if not folder.exists() or folder.is_symlink():  # (for a link, only the link is replaced, not what it points to)
        return
    if not folder.is_dir():
        raise CommandError(f"{os.fspath(shown)!r} is not a folder; this run writes its heatmaps there: move it, or "
                           f"choose another --out")
    for entry in folder.iterdir():
        if _written_by_the_system(entry.name):
            continue
        suffix = _HEATMAPS_SUBFOLDERS.get(entry.name) if entry.is_dir() else None
        if suffix is not None:
            foreign = next(
                (f for f in entry.iterdir() if not _written_by_the_system(f.name) and f.suffix.lower() != suffix), None
            )
        else:
            foreign = None if entry.is_file() and entry.suffix.lower() == ".png" else entry
        if foreign is not None:
            raise CommandError(
                f"{os.fspath(shown)!r} holds {os.fspath(Path(shown) / foreign.relative_to(folder))!r}, which maeday "
                f"detect does not write there; a run replaces that folder whole: move what you keep there, or choose "
                f"another --out"
            )


def _detect(args, call_kwargs, out_dir: Path, images: list[tuple[Path | str, str]], sources: list[Path],
            num_skipped: int = 0) -> int:
    """Score `sources` (local files; `images` holds what the user named, and the output names) into `out_dir`
    (`num_skipped`: images left out as unreadable, for the summary)."""
    from .images import load_rgb_image
    from .modeling import load_detector
    from .visualize import finite_max, overlay_heatmap

    detector = load_detector(args.model, device=args.device, base_model=args.base_model)

    # A map-style dataset in gives an iterator out: results stream while the bar advances, and workers (threads on a
    # GPU, DataLoader processes on a CPU where they are forked) decode and resize the next images while the model runs.
    on_gpu = detector.device.type == "cuda"
    batch_size = args.batch_size if args.batch_size is not None else (None if on_gpu else 8)  # None: the pipeline's
    results = detector(
        _PathDataset([str(source) for source in sources]), batch_size=batch_size, num_workers=args.num_workers,
        **call_kwargs,
    )
    rows = []
    # This run's heatmaps are drawn into a hidden folder that replaces heatmaps/ whole once every one is written, and
    # the scores into a hidden file renamed right after: an interrupted or failed run leaves the previous run's
    # outputs as they were, a finished one leaves none of them.
    scores_file = out_dir / "scores.csv"
    partial = pending_scores = None
    held = []
    try:
        for prefix in (".heatmaps.partial-", ".scores.csv.partial-"):
            remove_abandoned(out_dir, prefix)  # (left by a run that was killed outright)
        # (held while this run writes them: no later run takes them for abandoned)
        try:
            partial, handle = make_held_partial_dir(out_dir, ".heatmaps.partial-")
            held.append(handle)
            pending_scores, handle = make_held_partial_file(out_dir, ".scores.csv.partial-")
            held.append(handle)
        except OSError as error:  # (the name of a hidden temporary file would tell the user nothing)
            raise CommandError(f"cannot write into --out {os.fspath(out_dir)!r}: {error.strerror or error}") from None
        # Maps wait on disk, not in memory, until the common colour scale is known: beside the heatmaps, on the
        # --out disk the user chose (a full-size float32 map per image: 4 GB for 1,000 MVTec images, which a tmpfs
        # /tmp would hold in memory).
        maps_dir = partial / ".maps"
        maps_dir.mkdir()
        if args.save_maps:  # (subfolders: no heatmap's name has a separator, so none can collide with them)
            (partial / "maps").mkdir()
        vmax, largest = 0.0, 1
        progress = tqdm(zip(images, results), total=len(images), desc="maeday detect", disable=args.quiet)
        for index, ((path, name), result) in enumerate(progress):
            rows.append((redact_url(path) if isinstance(path, str) else str(path), result["score"],
                         result.get("label"), f"{name}.png"))
            try:
                np.save(maps_dir / f"{index}.npy", result["anomaly_map"])
                if args.save_maps and "mask" in result:
                    (partial / "masks").mkdir(exist_ok=True)
                    result["mask"].save(partial / "masks" / f"{name}.png", format="PNG", compress_type=zlib.Z_RLE)
            except OSError as error:
                raise CommandError(f"cannot keep the anomaly maps for the heatmaps in {os.fspath(out_dir)!r} until "
                                   f"every image is scored ({error}); free space there or choose another --out")
            vmax = max(vmax, finite_max(result["anomaly_map"]))
            largest = max(largest, result["anomaly_map"].size)

        def draw_heatmap(item) -> None:
            index, ((_, name), source) = item
            anomaly_map = np.load(maps_dir / f"{index}.npy")
            if args.save_maps:
                os.replace(maps_dir / f"{index}.npy", partial / "maps" / f"{name}.npy")
            else:
                (maps_dir / f"{index}.npy").unlink()
            overlay = overlay_heatmap(load_rgb_image(source), anomaly_map, vmin=0.0, vmax=vmax)
            # (zlib's run-length strategy: lossless as any PNG, ~2x faster to write than the default, no larger)
            overlay.save(partial / f"{name}.png", format="PNG", compress_type=zlib.Z_RLE)

        # Drawn in threads (decoding, blending and PNG encoding let go of the GIL): on a GPU, scoring takes a few ms
        # an image, and writing the heatmaps one at a time would take far longer than it. As many as the cores and
        # a memory budget allow: each holds its image, map, blend and encoder (up to ~70 bytes a pixel).
        num_threads = max(1, min(8, os.cpu_count() or 1, _HEATMAP_MEMORY_BUDGET // (70 * largest)))
        for _ in prefetch(enumerate(zip(images, sources)), draw_heatmap, num_threads, lookahead=2 * num_threads):
            pass
        maps_dir.rmdir()
        # A label column when labels exist: from --threshold or from a fine-tune's calibrated threshold.
        # The heatmap's file name (in heatmaps/; also of maps/*.npy and masks/*.png with --save-maps) last: where
        # names collide every one gets a running index, and the row says which file is its image's.
        with_labels = any(label is not None for _, _, label, _ in rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "score"] + (["label"] if with_labels else []) + ["heatmap"])
        for path, score, label, heatmap in rows:
            writer.writerow([path, f"{score:.6g}"] + ([label] if with_labels else []) + [heatmap])
        # UTF-8 everywhere, the csv module's line ends kept as they are; paths as the file system has them.
        pending_scores.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogateescape", newline="")
        replace_folder(
            partial, out_dir / "heatmaps", check_replaced=lambda old: _check_heatmaps_folder(old, out_dir / "heatmaps")
        )
        os.replace(pending_scores, scores_file)  # (a rename: it cannot half-happen)
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)  # (gone already when the swap succeeded)
        if pending_scores is not None:
            pending_scores.unlink(missing_ok=True)
        for handle in held:
            let_go(handle)
    kept = (" (with maps/ and masks/)" if with_labels else " (with maps/)") if args.save_maps else ""
    skipped = f" ({num_skipped} unreadable left out, each named above)" if num_skipped else ""
    print(f"Scored {len(rows)} images{skipped}: {out_dir / 'scores.csv'}, heatmaps in {out_dir / 'heatmaps'}{kept}")
    return 0


def _positive_pixel_count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of pixels >= 1 (e.g. 400000000), got {text!r}")
    return value


def add_max_image_pixels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-image-pixels", type=_positive_pixel_count, default=None, metavar="N",
        help="read images of up to N pixels (Pillow refuses more than 178,956,970 by default, as a guard against "
             "decompression bombs); e.g. 400000000 for 20,000 x 20,000 line-scan images",
    )


@contextlib.contextmanager
def images_allowed_up_to(num_pixels: int):
    """Within the block, Pillow decodes images of up to `num_pixels` pixels, and no more, without its
    decompression-bomb warning (the user chose the bound); its limit and warnings are restored afterwards. Pillow
    refuses an image above twice its `MAX_IMAGE_PIXELS` and warns above it."""
    from PIL import Image

    original = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = num_pixels // 2 if num_pixels % 2 == 0 else num_pixels / 2
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = original


def run_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(
        args.out, categories=tuple(args.categories), image_size=args.image_size, seed=args.seed
    )
    print(f"Wrote the synthetic defect set (MVTec layout) to {root}")
    return 0


def add_detect_parser(subparsers) -> None:
    parser = subparsers.add_parser("detect", help="zero-/few-shot anomaly maps and scores for images")
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) and/or image URLs")
    parser.add_argument("--model", default=DEFAULT_CHECKPOINT, help="Hub id or local ViTMAE/adapter folder")
    parser.add_argument("--base-model", default=None,
                        help="for an adapter: the base to merge into instead of the one it names (e.g. a moved copy)")
    parser.add_argument("--out", required=True,
                        help="output folder: scores.csv and heatmaps/ (replaced whole by each finished run)")
    parser.add_argument("--num-masks", type=int, default=DEFAULT_NUM_MASKS, help="masked reconstructions per image (N)")
    parser.add_argument("--mask-ratio", type=float, default=DEFAULT_MASK_RATIO, help="share of patches masked, in [0, 1) (a patch must stay visible)")
    parser.add_argument("--mask-schedule", choices=MASK_SCHEDULES, default="random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks, in [0, 2**32)")
    parser.add_argument("--threshold", type=float, default=None, help="adds a normal/anomalous label per image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch; their N masked copies run in forwards of at most --mask-batch-size "
                             "pairs (default: 8 on a CPU; on a GPU enough for 1,024 image x mask pairs, 32 at N = 32)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding ahead of the model: threads on a GPU (default up to 8, one fewer than the CPU "
                             "cores), processes on a CPU (default 0; threads where processes would not be forked: "
                             "macOS, Windows, Python >= 3.14)")
    parser.add_argument("--mask-batch-size", type=int, default=None,
                        help="most (image, mask) pairs per forward (default: 1024 on a GPU, 128 on a CPU)")
    parser.add_argument("--precision", choices=tuple(BF16_OF_PRECISION), default="auto",
                        help="the model's forward; auto: bf16 where the device multiplies it in hardware (GPUs from "
                             "Ampere on, CPUs with AVX512-BF16/AMX), else fp32; maps stay fp32")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds each image URL's download may take, in all (default: 60)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also keep each anomaly map (heatmaps/maps/<name>.npy, float32 at the image's size) and, "
                             "with labels, its mask (heatmaps/masks/<name>.png, 255 where the map exceeds the threshold)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="decode every image before scoring and leave out, each named in a warning, those that "
                             "cannot be read (e.g. damaged after the header by an interrupted copy); default: only "
                             "headers are checked first, and an image that fails to decode stops the run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_max_image_pixels_argument(parser)
    parser.set_defaults(handler=run_detect)


def add_synthetic_parser(subparsers) -> None:
    from .synthetic import CATEGORIES

    parser = subparsers.add_parser("synthetic", help="write the synthetic defect set in the MVTec AD layout")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run_synthetic)


FLAG_OF_FINETUNE_FIELD = {
    "num_steps": "--steps", "batch_size": "--batch-size", "learning_rate": "--learning-rate", "momentum": "--momentum",
    "weight_decay": "--weight-decay", "full_finetune": "--full-finetune", "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout", "mask_ratio": "--mask-ratio", "seed": "--seed",
    "calibration_views_per_shot": "--calibration-views", "calibration_num_masks": "--calibration-masks",
    "calibration_num_std": "--calibration-std", "min_crop_scale": "--min-crop-scale",
    "max_rotation_degrees": "--max-rotation", "view_supersampling": "--view-supersampling",
}
"""`FinetuneConfig`'s fields and the `maeday finetune` options that set them, for its error messages."""


@contextlib.contextmanager
def flag_names_in_errors(flag_of_field: dict[str, str]):
    """A `ValueError` / `TypeError` raised inside names the command's options instead of the Python fields they set
    (`num_steps must be >= 1` -> `--steps must be >= 1`)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        # Only where a field is named as a setting ("seed must", "lora_rank=", "lora_rank set together", "drop a or
        # b."), not the same word in prose ("32 bits of a seed").
        names = "|".join(map(re.escape, flag_of_field))
        pattern = re.compile(rf"(?<![\w/.-])({names})(?=\s+must\b|=|\s+set\b|,|\s+and\b|\s+or\b|\.(?:\s|$))")
        raise CommandError(pattern.sub(lambda match: flag_of_field[match.group(1)], str(error))) from None


def _finetune_config(args: argparse.Namespace):
    from .finetune import FinetuneConfig

    return FinetuneConfig(
        num_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        full_finetune=args.full_finetune,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        mask_ratio=args.mask_ratio,
        augment=not args.no_augment,
        seed=args.seed,
        calibration_views_per_shot=args.calibration_views,
        calibration_num_masks=args.calibration_masks,
        use_cpu=args.cpu,
        bf16=BF16_OF_PRECISION[args.precision],
        cuda_graph=not args.trainer_loop,
        disable_tqdm=args.quiet,
        **{field: value for field, value in (
            ("calibration_num_std", args.calibration_std), ("min_crop_scale", args.min_crop_scale),
            ("max_rotation_degrees", args.max_rotation), ("view_supersampling", args.view_supersampling),
        ) if value is not None},  # unset: FinetuneConfig's defaults, the paper's
    )


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    if (args.shots is None) == (args.dataset_root is None):
        raise CommandError("give the shots either as --shots FILES_OR_FOLDERS or as --dataset-root ROOT --category C "
                           "--num-shots K (not both, not neither)")
    if args.dataset_root is None and (
        args.category is not None or args.num_shots is not None or args.shot_seed is not None
    ):
        raise CommandError(
            "--category, --num-shots and --shot-seed pick shots from --dataset-root; with --shots every file is used"
        )
    with flag_names_in_errors(FLAG_OF_FINETUNE_FIELD):
        config = _finetune_config(args)
    if args.dataset_root is not None:
        if args.category is None or args.num_shots is None:
            raise CommandError("--dataset-root needs --category and --num-shots (k)")
        if args.num_shots < 1:
            raise CommandError(f"--num-shots must be >= 1, got {args.num_shots} (zero-shot detection needs no "
                               f"fine-tune: run maeday detect with the base model)")
        from .data import load_mvtec

        shots = load_mvtec(args.dataset_root, args.category)["train"]
        if args.num_shots > len(shots):
            raise CommandError(f"--num-shots {args.num_shots} is more than the {len(shots)} normal training images of "
                               f"{args.category!r}")
    else:
        shots = args.shots
    result = finetune(
        args.model,
        shots,
        args.output_dir,
        config,
        num_shots=args.num_shots,
        shot_seed=args.shot_seed if args.shot_seed is not None else 0,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        hub_private=args.hub_private,
        base_model_id=args.base_model_id,
    )
    if result.calibration is not None:  # main process only
        print(f"Wrote {result.output_dir} (threshold {result.calibration.threshold:.6g})")
    return 0


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The `maeday finetune` options (also used by scripts/finetune.py); defaults are the paper's recipe."""
    parser.add_argument("--model", default=DEFAULT_CHECKPOINT, help="base ViTMAE: Hub id or local folder")
    parser.add_argument("--base-model-id", default=None,
                        help="with a local --model that is a copy of a Hub checkpoint: its Hub id, which the adapter "
                             "then names as its base (else the folder's path), so it loads anywhere once pushed")
    parser.add_argument("--shots", nargs="+", default=None, help="normal shot images and/or folders of them")
    parser.add_argument("--dataset-root", default=None, help="MVTec-layout root to pick shots from (with --category)")
    parser.add_argument("--category", default=None, help="category under --dataset-root")
    parser.add_argument("--num-shots", type=int, default=None, help="k shots picked from the category's train split")
    parser.add_argument("--shot-seed", type=int, default=None,
                        help="seed of the shot choice from --dataset-root (default 0; same seed, same shots)")
    parser.add_argument("--output-dir", required=True, help="adapter folder to write (appears when the run ends)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir that an earlier run wrote (or an empty one)")
    parser.add_argument("--push-to-hub", action="store_true", help="upload the folder to --hub-model-id")
    parser.add_argument("--hub-model-id", default=None, help="ORG/NAME of the Hub repo to push to")
    parser.add_argument("--hub-private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--steps", type=int, default=50, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=32, help="views per step over all processes")
    parser.add_argument("--learning-rate", type=float, default=None, help="default 1e-2 (LoRA) or 1e-4 (full)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
    parser.add_argument("--lora-rank", type=int, default=None, help="default 32")
    parser.add_argument("--lora-alpha", type=float, default=None, help="default: the rank (scale 1)")
    parser.add_argument("--lora-dropout", type=float, default=None, help="default 0")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches masked per view")
    parser.add_argument("--no-augment", action="store_true", help="no random crop/rotation (masks still differ)")
    parser.add_argument("--seed", type=int, default=0, help="seed of views, masks and the Trainer, in [0, 2**32)")
    parser.add_argument("--calibration-views", type=int, default=4, help="views per shot scored for the threshold (the shot and augmented views; with --no-augment the shot only)")
    parser.add_argument("--calibration-masks", type=int, default=32, help="masks per calibration view")
    parser.add_argument("--calibration-std", type=float, default=None,
                        help="threshold = mean + this many standard deviations of the scores of the shots and their "
                             "calibration views, or 1.01 x their maximum if higher (default 3)")
    parser.add_argument("--min-crop-scale", type=float, default=None,
                        help="smallest share of the image's area a view's random crop covers (default 0.75)")
    parser.add_argument("--max-rotation", type=float, default=None,
                        help="largest random rotation of a view, in degrees (default 15)")
    parser.add_argument("--view-supersampling", type=float, default=None,
                        help="cut the views from the shots at up to this many times the model's input size, then "
                             "downsample them (default 3: sharper crops, closer to the queries; 1: from the shots "
                             "resized to the model's input, each crop upsampled)")
    parser.add_argument("--trainer-loop", action="store_true",
                        help="on one GPU, run the Trainer loop instead of CUDA graph replays")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    parser.add_argument("--precision", choices=tuple(BF16_OF_PRECISION), default="auto",
                        help="auto: under accelerate launch its --mixed_precision, else bf16 mixed precision where "
                             "the device multiplies bf16 in hardware (GPUs from Ampere on, CPUs with "
                             "AVX512-BF16/AMX), else fp32; bf16/fp32 override accelerate's setting")
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                        help="same as --precision bf16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_max_image_pixels_argument(parser)


def add_finetune_parser(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="few-shot fine-tuning on normal shots (LoRA -> adapter folder; or all weights)")
    add_finetune_arguments(parser)
    parser.set_defaults(handler=run_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maeday", description="MAEDAY anomaly detection with a Masked Autoencoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_detect_parser(subparsers)
    add_synthetic_parser(subparsers)
    add_finetune_parser(subparsers)
    for command in subparsers.choices.values():  # also after the command (`maeday finetune ... -v`, scripts/finetune.py)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log at INFO level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    max_image_pixels = getattr(args, "max_image_pixels", None)
    try:
        with terminate_as_interrupt(), (
            contextlib.nullcontext() if max_image_pixels is None else images_allowed_up_to(max_image_pixels)
        ):
            return args.handler(args)
    except (CommandError, *USER_ERRORS) as error:
        print(f"maeday: error: {one_line_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"maeday: {how_stopped(error)}", file=sys.stderr)
        return interrupted_status(error)


program = as_program(main)
"""The `maeday` command."""

if __name__ == "__main__":
    sys.exit(program())
