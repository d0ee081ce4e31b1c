"""Which device a call runs on: one check, shared by the detector, PatchCore and the protocol.

Depends only on torch, so the pipeline's remote-code bundle can carry it.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | int | torch.device | None) -> str | int | torch.device:
    """`"auto"`/None -> `"cuda"` when available, else `"cpu"`; anything else is returned as it is, once it is known to
    exist here (a `ValueError` naming it otherwise, rather than an error from deep inside torch at the first copy).

    An int is a CUDA index, as in `transformers.pipeline`, where -1 means the CPU.
    """
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        if device == -1:
            return device
        name = f"cuda:{device}"
    else:
        name = device
    try:
        parsed = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"device={device!r} is not a device ({str(error).splitlines()[0]}); expected 'auto', 'cpu', 'cuda', "
            f"'cuda:1', ... or a CUDA index."
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r}, but no CUDA GPU is available here; use 'cpu' or 'auto'.")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device={device!r}, but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}.")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}, but MPS (Apple GPU) is not available here; use 'cpu' or 'auto'.")
    return device


def as_torch_device(device: str | int | torch.device | None) -> torch.device:
    """`resolve_device`, as a `torch.device` (an int is a CUDA index, -1 the CPU)."""
    device = resolve_device(device)
    if isinstance(device, int):
        return torch.device("cpu") if device == -1 else torch.device("cuda", device)
    return torch.device(device)
