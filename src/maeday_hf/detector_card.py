"""The README.md (model card) that `AnomalyDetectionPipeline.save_pretrained` / `push_to_hub` write with a detector,
and the push's commit.

Shipped as remote code with `pipeline.py`: it imports only the standard library and `huggingface_hub` (a dependency
of transformers). A fine-tune folder has its own, fuller card (`maeday_hf.model_card`); this one describes what a
saved detector holds: the weights, the scoring defaults, and the calibrated threshold if the checkpoint has one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from typing import Any

from huggingface_hub import ModelCardData

logger = logging.getLogger(__name__)

_MARKER = "<!-- written by maeday_hf ({digest}): saving the detector again rewrites this card unless it is edited -->"
_MARKER_LINE = re.compile(r"<!-- written by maeday_hf \(([0-9a-f]{16})\): [^\n]*-->\n")
"""A card whose marker line holds the digest of the rest of its text is maeday_hf's, unedited, and may be rewritten;
any other README.md (the owner's, or a generated card someone edited) is kept."""

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")

CARD_TEMPLATE = """---
{metadata}
---

{marker}

# MAEDAY anomaly detector: {name}

{summary}

Each query is reconstructed {num_masks} times by the masked autoencoder, each time from a different random
{kept_percent:g} % of its patches (mask ratio {mask_ratio:g}; the masks are seeded, so a score is reproducible).
The squared error of every full reconstruction, Gaussian-filtered (kernel {kernel_size}, sigma {sigma:g}) and summed
over the colour channels, is averaged over the masks into the pixel anomaly map; the image score is its maximum at
the model's resolution, and the map is returned resized to the image's own size (which lowers its peak a little)
(paper: *MAEDAY: MAE for few and zero shot AnomalY-Detection*).

## Use

```python
{usage}
```

Without `maeday_hf` installed, `transformers.pipeline(model={name!r}, trust_remote_code=True)` runs the pipeline
code shipped here (`pipeline.py` and the modules it imports).

## Checkpoint

| setting | value |
|---|---|
| image size | {image_size} px |
| patch size | {patch_size} px |
| encoder | {encoder} |
| decoder | {decoder} |
| compared in | {target_space} |

## Threshold

{threshold_text}

## Intended use and limits

- Textures and repetitive surfaces (fabric, wood, tiles, floors, asphalt), where the image is its own reference, suit
  the zero-shot setting best; for objects, fine-tune on a few normal images (`maeday finetune`).
- Scores are not calibrated probabilities: their scale depends on the checkpoint and on the images. Choose a threshold
  on normal images of your own process.
- Defects smaller than a patch ({patch_size} px of the {image_size} px input) can be missed: every image is resized to
  {image_size} x {image_size} first.

## Citation

*MAEDAY: MAE for few and zero shot AnomalY-Detection* (Schwartz et al.); *Masked Autoencoders Are Scalable Vision
Learners* (He et al., CVPR 2022).
"""


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub model id ("name" or "org/name"), not a local path."""
    return not os.path.isabs(name) and _HUB_ID.fullmatch(name) is not None and ".." not in name


def render_detector_card(
    name: str,
    config: Any,
    source: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    num_masks: int = 32,
    mask_ratio: float = 0.75,
    kernel_size: int = 7,
    sigma: float = 1.4,
    threshold: float | None = None,
    threshold_settings: dict[str, Any] | None = None,
) -> str:
    """Markdown card with Hub metadata for a saved detector.

    Args:
        name (`str`): what readers load it by (the repo id, or the folder's name).
        config (`ViTMAEConfig`): the model's config.
        source (`str`, *optional*): where the model was loaded from (`model.name_or_path`); named as `base_model`
            only if it is a Hub id other than `name` (a local path says nothing to the card's readers).
        tags (`list[str]`, *optional*): more Hub tags.
        license (`str`, *optional*): the Hub license id, if known (the weights' license carries over).
        threshold, threshold_settings: a few-shot fine-tune's calibrated threshold and the settings it holds for.
    """
    base_model = source if source and source != name and is_hub_id(source) else None
    fine_tuned = threshold is not None
    metadata = ModelCardData(
        library_name="transformers",
        license=license,
        base_model=base_model,
        # custom_code: the Hub's tag for a repo whose code loads with trust_remote_code=True.
        tags=list(dict.fromkeys([
            "anomaly-detection", "maeday", "vit_mae", "few-shot" if fine_tuned else "zero-shot", "custom_code",
            *(tags or []),
        ])),
    ).to_yaml()
    origin = (f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model
              else "a ViTMAEForPreTraining checkpoint")
    if fine_tuned:
        summary = (f"A few-shot MAEDAY detector: {origin} fine-tuned on normal images of one kind (its LoRA adapter, "
                   f"if it had one, merged into the weights), with the threshold calibrated on those images.")
        settings = ", ".join(f"{key} {value}" for key, value in sorted((threshold_settings or {}).items()))
        threshold_text = (
            f"`{threshold:.6g}`, calibrated on the normal shots{f' ({settings})' if settings else ''}: the pipeline's "
            f"default `threshold` (adds `label` and `mask`) at those settings; pass `threshold=` to override."
        )
    else:
        summary = (f"A zero-shot MAEDAY detector: {origin} used as it is, with no training on the images it "
                   f"inspects.")
        threshold_text = (
            "None: a zero-shot detector has no normal images to calibrate on. Pass `threshold=` to get `label` and "
            "`mask` (for example from the scores of a few known-normal images)."
        )
    card = CARD_TEMPLATE.format(
        metadata=metadata,
        marker="{marker}",
        name=name,
        summary=summary,
        num_masks=num_masks,
        kept_percent=round(100 * (1 - mask_ratio), 6),
        mask_ratio=mask_ratio,
        kernel_size=kernel_size,
        sigma=sigma,
        # (Not a line of the template: transformers reads a shipped module's lines that begin with `import X` as
        # packages it needs, and would refuse to load this one where maeday_hf is not installed.)
        usage="\n".join((
            "import maeday_hf",
            f"detector = maeday_hf.load_detector({name!r})",
            f"result = detector(\"query.png\")  # score, anomaly_map{', label, mask' if fine_tuned else ''}",
        )),
        image_size=getattr(config, "image_size", "?"),
        patch_size=getattr(config, "patch_size", "?"),
        encoder=(f"{getattr(config, 'num_hidden_layers', '?')} layers, width {getattr(config, 'hidden_size', '?')}, "
                 f"{getattr(config, 'num_attention_heads', '?')} heads"),
        decoder=(f"{getattr(config, 'decoder_num_hidden_layers', '?')} layers, width "
                 f"{getattr(config, 'decoder_hidden_size', '?')}, "
                 f"{getattr(config, 'decoder_num_attention_heads', '?')} heads"),
        target_space=("each patch normalised by its own mean and variance (norm_pix_loss)"
                      if getattr(config, "norm_pix_loss", False) else "the normalised pixels the model sees"),
        threshold_text=threshold_text,
    )
    return card.replace("{marker}", _MARKER.format(digest=_digest(card.replace("{marker}\n", "", 1))), 1)


_UNMARKED_FINETUNE_CARD = ("# MAEDAY few-shot ", "## Threshold (from the normal shots only)")
"""Lines every fine-tune card had before fine-tune cards were marked (2026-11-29): such a card is maeday_hf's."""


def is_generated_finetune_card(card: str) -> bool:
    """`is_generated_text`, or a fine-tune card of before the marker (recognised by its heading and sections)."""
    if _MARKER_LINE.search(card) is not None:
        return is_generated_text(card)
    return all(line in card for line in _UNMARKED_FINETUNE_CARD)


def marked_as_generated(card: str) -> str:
    """`card` with the marker line that `is_generated_text` recognises (for other cards maeday_hf writes, such as a
    fine-tune's): pushed again, it is rewritten; edited, it is kept."""
    card = card if card.endswith("\n") else card + "\n"
    return card + _MARKER.format(digest=_digest(card)) + "\n"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


_FIRST_MARKER = "<!-- written by maeday_hf: saving the detector again rewrites this card -->"
"""The marker of the first generated cards (2026-11-29, before the digest): rewritten as the card's own."""


def is_generated_text(card: str) -> bool:
    """Whether `card` is a card this module wrote, as it wrote it (its marker's digest matches the rest of it)."""
    match = _MARKER_LINE.search(card)
    if match is None:
        return _FIRST_MARKER in card
    return match.group(1) == _digest(card[: match.start()] + card[match.end():])


def is_generated_card(path: str | os.PathLike) -> bool:
    """Whether the README.md at `path` is missing, or a card this module wrote and nobody edited since (so it may
    be rewritten)."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as card:
            return is_generated_text(card.read())
    except FileNotFoundError:
        return True


def write_card(path: str | os.PathLike, card: str) -> None:
    """Write `card` to `path` through a new file in the same folder (with the umask's permissions, as `open` gives),
    renamed over it: never half-written."""
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)), f".README.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8", newline="\n") as out:
            out.write(card)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def read_remote_card(api, repo_id: str, revision: str | None = None) -> str | None:
    """The text of `repo_id`'s README.md at `revision` (at `main` while that branch does not exist yet: it will be
    made from there), or None if it has none."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RevisionNotFoundError

    for ref in dict.fromkeys((revision, None)):
        try:
            # (force_download: a copy cached earlier must not stand in for the card when the Hub cannot be asked)
            path = api.hf_hub_download(repo_id, "README.md", revision=ref, force_download=True)
        except RevisionNotFoundError:
            continue
        except LocalEntryNotFoundError:
            raise  # the Hub could not be asked (5xx, timeout): not "the repo has no card", which would replace it
        except EntryNotFoundError:
            return None
        with open(path, encoding="utf-8", errors="replace", newline="") as card:
            return card.read()
    return None


def card_for_push(remote: str | None, render, tags: list[str] | None) -> str | None:
    """The README.md to upload: `render()` (the detector's card) where the repo has none or an unedited generated one;
    else the repo's own with `tags` added, or None (upload none: it stays as it is) when no tags are given or its
    metadata cannot be read."""
    if remote is None or is_generated_text(remote):
        return render()
    if not tags:
        return None
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(remote)
    except (ValueError, yaml.YAMLError) as error:
        logger.warning("The repo's README.md is kept as it is: its metadata could not be read to add tags %s (%s).",
                       tags, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    return str(card)


def commit_folder(api, folder: str, repo_id: str, commit_message: str, commit_description: str | None,
                  revision: str | None, create_pr: bool):
    """Every file of `folder` in one commit to `revision` (a branch, created if missing, as transformers' push does)
    or in a pull request against it."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
        except HfHubHTTPError as error:
            # (a pull request into a repo one cannot write to: the branch must exist already; the commit says if not)
            if not (create_pr and getattr(error.response, "status_code", None) == 403):
                raise
    operations = [
        CommitOperationAdd(path_in_repo=os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"),
                           path_or_fileobj=os.path.join(root, name))
        for root, _, names in os.walk(folder) for name in sorted(names)
    ]
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                             commit_description=commit_description, revision=revision, create_pr=create_pr)
