"""Keep a GPU busy: preprocess ahead in threads, and copy results back while the next batch computes.

The stock `Pipeline` loop runs preprocess -> forward -> copy to CPU -> postprocess one batch after the other, so the
GPU waits for the CPU between batches. Here, for a GPU pipeline:

- `prefetch` runs the (GIL-releasing) decoding and resizing of upcoming items in a thread pool, a bounded number of
  items ahead, in order;
- `copy_to_host_async` starts the device-to-host copy of a batch's outputs into pinned memory and returns at once;
  `PendingOutputs.wait()` blocks only when those outputs are needed, by which time the next batch is queued on the
  GPU.

Nothing here changes a result: items come back in input order, computed by the same functions.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def default_num_threads() -> int:
    """Preprocessing threads: up to 8, leaving one core to the thread that drives the GPU."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def prefetch(items: Iterable[Any], function: Callable[[Any], Any], num_threads: int, lookahead: int) -> Iterator[Any]:
    """`function(item)` for each item, in order, computed up to `lookahead` items ahead by `num_threads` threads
    (0: in the calling thread, one item at a time).

    An exception raised by `function`, or by `items` while producing an item, is raised here, at that item: the items
    before it are returned first, as the stock loop would.
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be at least 1, got {lookahead}.")
    if num_threads == 0:
        yield from map(function, items)
        return
    iterator = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="maeday-preprocess") as pool:
        source_ended = False

        def submit_next() -> concurrent.futures.Future | None:
            nonlocal source_ended
            if source_ended:
                return None
            try:
                item = next(iterator)
            except StopIteration:
                source_ended = True
                return None
            except Exception as error:  # noqa: BLE001 - re-raised at this item's turn, after the ones before it
                source_ended = True
                failed = concurrent.futures.Future()
                failed.set_exception(error)
                return failed
            return pool.submit(function, item)

        pending = collections.deque()
        while len(pending) < lookahead and (future := submit_next()) is not None:
            pending.append(future)
        try:
            while pending:
                result = pending.popleft().result()
                if (future := submit_next()) is not None:
                    pending.append(future)
                yield result
        finally:
            for future in pending:
                future.cancel()


def batched(items: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `batch_size` items (the last may be shorter)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, batch_size)):
        yield batch


class PendingOutputs:
    """Outputs on their way to host memory; `wait()` returns them once the copies have landed."""

    def __init__(self, outputs: dict[str, torch.Tensor], event: torch.cuda.Event | None):
        self._outputs = outputs
        self._event = event

    def wait(self) -> dict[str, torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self._outputs


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def copy_to_host_async(outputs: dict[str, Any]) -> PendingOutputs:
    """Start copying every CUDA tensor of `outputs` (values, or lists of them) into pinned host memory, on a side
    stream so the copy overlaps the next batch's compute; other values pass through."""
    cuda_tensors = [
        tensor
        for value in outputs.values()
        for tensor in (value if isinstance(value, list) else [value])
        if isinstance(tensor, torch.Tensor) and tensor.is_cuda
    ]
    if not cuda_tensors:
        return PendingOutputs(dict(outputs), None)
    stream = _copy_stream(cuda_tensors[0].device)
    stream.wait_stream(torch.cuda.current_stream(cuda_tensors[0].device))

    def to_host(value):
        if isinstance(value, list):
            return [to_host(item) for item in value]
        if not (isinstance(value, torch.Tensor) and value.is_cuda):
            return value
        pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        pinned.copy_(value, non_blocking=True)
        value.record_stream(stream)  # its memory is not reused before the copy has read it
        return pinned

    with torch.cuda.stream(stream):
        host = {key: to_host(value) for key, value in outputs.items()}
        event = torch.cuda.Event()
        event.record(stream)
    return PendingOutputs(host, event)
