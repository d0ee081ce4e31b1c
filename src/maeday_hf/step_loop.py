"""The fine-tuning steps without the `Trainer` loop around them: on one GPU, each step is one CUDA graph replay.

A LoRA step on ViT-B launches some 4,000 small kernels (every Linear gains two more matmuls, plus their casts and
gradients); Python launching them, not the GPU running them, sets the pace. Captured once into a CUDA graph, a step
is replayed with one launch. The math is the Trainer's: the same optimizer (built by `Trainer.create_optimizer`, so
the same parameter groups and weight decay), the same views in the same order, the same loss, no gradient clipping.

The capture needs a few eager steps first (they create the gradients and momentum buffers the graph reuses, and
settle the libraries' lazy set-up): those are the run's own first steps, so the run computes exactly `num_steps`
steps, and the graph takes over from there.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from .reconstruction import reconstruction_targets
from .training_loss import all_patch_loss

logger = logging.getLogger(__name__)

DEFAULT_WARMUP_STEPS = 3


def _views_on(views, num_steps: int, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """What every view of the run is made of (shot, transform, mask noise), on `device`, in one copy."""
    everything = views.batch(range(num_steps * batch_size))
    return {key: value.to(device) for key, value in everything.items()}


def _step_batch(all_views: dict[str, torch.Tensor], step: int, batch_size: int) -> dict[str, torch.Tensor]:
    return {key: value[step * batch_size : (step + 1) * batch_size] for key, value in all_views.items()}


def views_loss(trained, reconstruction_model, views, batch, autocast=None):
    """All-patch loss of one batch of views, and the model's outputs: the views rendered on the batch's device, the
    model's forward (under `autocast`, if given), the loss against the views in the scoring space."""
    pixel_values = views.render(batch)
    with autocast if autocast is not None else contextlib.nullcontext():
        outputs = trained(pixel_values=pixel_values, noise=batch["noise"])
    return all_patch_loss(outputs.logits, reconstruction_targets(reconstruction_model, pixel_values)), outputs


def step_loss(trained, reconstruction_model, views, batch, bf16: bool) -> torch.Tensor:
    """`views_loss` of one step, the forward under bf16 autocast if asked."""
    # No autocast weight cache: inside a CUDA graph, cached casts would be captured once and go stale.
    device_type = batch["noise"].device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else None
    return views_loss(trained, reconstruction_model, views, batch, autocast)[0]


def run_steps(
    trained: torch.nn.Module,
    reconstruction_model: torch.nn.Module,
    views,
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    batch_size: int,
    bf16: bool = False,
    cuda_graph: bool | None = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
) -> list[float]:
    """`num_steps` optimizer steps over consecutive batches of `views`; returns the loss of every step.

    Args:
        trained: the model whose trainable parameters `optimizer` holds (a `PeftModel`, or the model itself).
        reconstruction_model (`ViTMAEForPreTraining`): the unwrapped model (for `patchify` and `norm_pix_loss`).
        views (`ShotViews`): at least `num_steps * batch_size` views.
        cuda_graph (`bool`, *optional*): replay a captured graph per step; by default on CUDA (and only there).
        warmup_steps (`int`, defaults to 3): with `cuda_graph`, how many of the run's first steps run eagerly before
            the capture; at least 1, which creates the gradients and momentum buffers the graph reuses.

    Raises:
        GraphCaptureError: the capture failed. There is no eager fallback in the same process: a failed capture can
            leave CUDA's stream and PyTorch's allocator in a state later work should not meet; rerun with
            `cuda_graph=False` (`maeday finetune --trainer-loop`).
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}.")
    device = next(trained.parameters()).device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph:
        _require_cuda(device)
    trained.train()
    all_views = _views_on(views, num_steps, batch_size, device)
    losses = torch.zeros(num_steps, device=device)

    def eager_step(step: int) -> None:
        loss = step_loss(trained, reconstruction_model, views, _step_batch(all_views, step, batch_size), bf16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = loss.detach()

    if not cuda_graph:
        for step in range(num_steps):
            eager_step(step)
        return losses.tolist()
    first_replayed = min(warmup_steps, num_steps)
    started = time.perf_counter()
    with _side_stream(device):  # (as CUDA's graph docs warm up: off the stream the graph will be replayed on)
        for step in range(first_replayed):
            eager_step(step)
    if first_replayed == num_steps:
        return losses.tolist()
    graph, static_batch, static_loss = _capture(
        trained, reconstruction_model, views, optimizer, _step_batch(all_views, first_replayed, batch_size), bf16,
        device,
    )
    timed = logger.isEnabledFor(logging.INFO)
    if timed:  # (one host sync, only when asked: where a run's time goes, for scripts/benchmark_finetune.py)
        torch.cuda.synchronize(device)
        captured = time.perf_counter()
    for step in range(first_replayed, num_steps):
        for key, value in _step_batch(all_views, step, batch_size).items():
            static_batch[key].copy_(value)
        graph.replay()
        losses[step].copy_(static_loss)
    optimizer.zero_grad(set_to_none=True)  # as after every eager step; frees the graph's gradients
    step_losses = losses.tolist()
    if timed:
        finished = time.perf_counter()
        logger.info(
            "%d eager steps and the capture took %.3f s; %d replays %.3f s (%.1f ms per step)",
            first_replayed, captured - started, num_steps - first_replayed, finished - captured,
            1e3 * (finished - captured) / (num_steps - first_replayed),
        )
    return step_losses


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True replays CUDA graphs, but the model is on {device}.")


class GraphCaptureError(RuntimeError):
    """The fine-tuning step could not be captured as a CUDA graph (rerun with `cuda_graph=False`)."""


def _side_stream(device: torch.device):
    """A context running its work on a fresh CUDA stream that waits for, and is then waited for by, the current one;
    no-op off CUDA."""
    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def on_side_stream():
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side_stream):
                yield
        finally:
            torch.cuda.current_stream(device).wait_stream(side_stream)

    return on_side_stream()


def _capture(trained, reconstruction_model, views, optimizer, first_batch: dict[str, torch.Tensor], bf16: bool,
             device: torch.device):
    """One step (loss, backward, optimizer step) captured as a CUDA graph on `device`, reading its views from
    `static_batch`."""
    static_batch = {key: value.clone() for key, value in first_batch.items()}
    optimizer.zero_grad(set_to_none=True)  # the graph's backward assigns (not accumulates) the gradients it owns
    with torch.cuda.device(device):  # the capture's stream and synchronisation are the current device's
        stream = torch.cuda.current_stream(device)
        graph = torch.cuda.CUDAGraph()
        body_error = None
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                try:
                    static_loss = step_loss(trained, reconstruction_model, views, static_batch, bf16)
                    static_loss.backward()
                    optimizer.step()
                except Exception as error:
                    body_error = error
                    raise
        except Exception as error:
            # torch.cuda.graph leaves its capture stream current when ending the capture fails; put ours back.
            torch.cuda.set_stream(stream)
            cause = body_error or error  # the step's own failure, not the end-of-capture error it may cause
            raise GraphCaptureError(
                f"CUDA graph capture of the fine-tuning step failed ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}); rerun with cuda_graph=False (--trainer-loop "
                f"of maeday finetune and maeday-evaluate)."
            ) from error
    return graph, static_batch, static_loss
