"""Bundles from Lightning checkpoints (``python -m aniportrait.bundle export CKPT OUT``)."""

from __future__ import annotations

import importlib
from pathlib import Path

from aniportrait.bundle import BUNDLE_FILE, export_bundle
from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpoints import read_training_checkpoint
from aniportrait.utils.outputs import Overwrite, check_output_dir

__all__ = ["export_from_lightning_checkpoint"]


def export_from_lightning_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Rebuild the LightningModule a checkpoint came from, load its weights, and export its bundle (an existing
    bundle at ``out_dir`` is replaced only with ``overwrite``)."""
    checkpoint_path = Path(checkpoint_path)
    # the output first: refused before the checkpoint is read or any model is built
    check_output_dir(out_dir, {"CKPT": checkpoint_path}, Overwrite(overwrite, "--force"), "bundle", BUNDLE_FILE)
    checkpoint = read_training_checkpoint(checkpoint_path, key="CKPT")
    info = checkpoint["aniportrait"]
    module_name, _, class_name = info["module_class"].rpartition(".")
    module_class = getattr(importlib.import_module(module_name), class_name)
    module = module_class(**checkpoint.get("hyper_parameters", {}))
    module.on_load_checkpoint(checkpoint)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise AniPortraitError(f"{checkpoint_path}: weights do not fit {class_name}: missing {missing[:8]}, "
                               f"unexpected {unexpected[:8]}")
    components, state_dicts, settings, base_models = module.bundle_parts()
    provenance = {"checkpoint": str(checkpoint_path.resolve()), "global_step": int(checkpoint.get("global_step", 0))}
    return export_bundle(out_dir, components, settings=settings, base_models=base_models, provenance=provenance,
                         state_dicts=state_dicts, overwrite=overwrite)
