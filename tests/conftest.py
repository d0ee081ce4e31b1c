"""Shared fixtures: offline Hub, tiny random ViTMAE checkpoints saved to temp folders."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Before any Hugging Face import: the Hub is never reached from the tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8


def make_tiny_config(**overrides) -> ViTMAEConfig:
    """A tiny ViTMAE; odd sizes (intermediate 37) catch dimension mix-ups."""
    kwargs = dict(
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        num_channels=3,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=37,
        mask_ratio=0.75,
        norm_pix_loss=False,
    )
    kwargs.update(overrides)
    return ViTMAEConfig(**kwargs)


def make_tiny_model(seed: int = 0, **overrides) -> ViTMAEForPreTraining:
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(make_tiny_config(**overrides))
    # Random init leaves the mask token and both position embeddings at zero (pretrained checkpoints carry them);
    # give them values, so the model knows where each patch is and masking matters.
    with torch.no_grad():
        model.decoder.mask_token.normal_(std=0.5)
        model.vit.embeddings.position_embeddings.normal_(std=0.5)
        model.decoder.decoder_pos_embed.normal_(std=0.5)
    return model.eval()


class RecordedOps(TorchDispatchMode):
    """Records the name of every aten op dispatched inside its `with` block (`.item()` shows as
    `_local_scalar_dense`, the op behind every host sync)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def save_tiny_checkpoint(folder, seed: int = 0, **overrides) -> str:
    model = make_tiny_model(seed, **overrides)
    model.save_pretrained(folder)
    ViTImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """Path to a saved tiny ViTMAEForPreTraining + image processor (norm_pix_loss=False)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vit-mae"))


@pytest.fixture(scope="module")
def detector(tiny_checkpoint):
    """The `anomaly-detection` pipeline on the tiny checkpoint, on the CPU (one per test module)."""
    import maeday_hf  # noqa: F401 - registers the task
    from transformers import pipeline

    return pipeline("anomaly-detection", model=tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tiny_norm_pix_checkpoint(tmp_path_factory) -> str:
    """Same geometry, norm_pix_loss=True."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vit-mae-npl"), seed=1, norm_pix_loss=True)


def load_script(name: str):
    """`scripts/<name>.py` imported as a module (the scripts are not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
