"""The training recipe behind ``train.py``: build everything from the config, fit, validate, export.

Reads top to bottom: data source -> LightningModule -> datamodule -> callbacks and loggers -> Trainer ->
fit (or resume) -> final validation -> bundle. Loggers are always closed, also when training fails.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["train", "print_metrics"]

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [hydra.utils.instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def _module_config(model_cfg: DictConfig) -> DictConfig:
    """The LightningModule's config: the model group minus the datamodule (``loader``) settings."""
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k != "loader"})


def _final_metrics(trainer: pl.Trainer, module: pl.LightningModule, datamodule) -> dict[str, float]:
    """Validation metrics at the last step (runs validation again if the last one was earlier)."""
    if getattr(module, "last_validated_step", -1) != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def print_metrics(metrics: dict[str, float]) -> None:
    if not metrics:
        return
    width = max(len(name) for name in metrics)
    print("\n| metric | value |\n|---|---|")
    for name in sorted(metrics):
        print(f"| {name:<{width}} | {metrics[name]:.4f} |")


def train(cfg: DictConfig) -> tuple[dict[str, float], Path | None]:
    """Fit the configured stage; returns (final validation metrics, bundle path or None)."""
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    output_dir = Path(cfg.paths.output_dir)

    source = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(_module_config(cfg.model), _recursive_=False)
    datamodule = hydra.utils.instantiate(cfg.model.loader, source=source)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
        for logger in loggers:
            logger.log_hyperparams(resolved)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = _final_metrics(trainer, module, datamodule)
        bundle = None
        if cfg.get("export", True) and trainer.is_global_zero:
            bundle = module.export(
                output_dir / "bundle",
                provenance={"run_dir": str(output_dir), "metrics": metrics, "global_step": trainer.global_step,
                            "command": " ".join(sys.argv), "config": resolved},
            )
    finally:
        for logger in loggers:
            logger.finalize("success")
            if isinstance(logger, pl.loggers.WandbLogger):
                import wandb

                wandb.finish()
    return metrics, bundle
