"""Bundles from Lightning checkpoints (``python -m aniportrait.bundle export CKPT OUT``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from aniportrait.errors import AniPortraitError

__all__ = ["export_from_lightning_checkpoint"]


def export_from_lightning_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Rebuild the LightningModule a checkpoint came from, load its weights, and export its bundle."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise AniPortraitError(f"checkpoint not found: {checkpoint_path}")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for foreign or broken files
        raise AniPortraitError(f"cannot read {checkpoint_path} as a weights-only Lightning checkpoint ({error})") from error
    info = checkpoint.get("aniportrait") if isinstance(checkpoint, dict) else None
    if not info or "module_class" not in info:
        raise AniPortraitError(
            f"{checkpoint_path} is not a checkpoint written by aniportrait training (no 'aniportrait' entry); "
            "official release files are imported with `python -m aniportrait.bundle import-official`"
        )
    module_name, _, class_name = info["module_class"].rpartition(".")
    module_class = getattr(importlib.import_module(module_name), class_name)
    module = module_class(**checkpoint.get("hyper_parameters", {}))
    module.on_load_checkpoint(checkpoint)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise AniPortraitError(f"{checkpoint_path}: weights do not fit {class_name}: missing {missing[:8]}, "
                               f"unexpected {unexpected[:8]}")
    return module.export(out_dir, provenance={"checkpoint": str(checkpoint_path.resolve()),
                                              "global_step": int(checkpoint.get("global_step", 0))})
