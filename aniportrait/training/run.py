"""The training recipe behind ``train.py``: build everything from the config, fit, validate, export.

Reads top to bottom: data source -> for each stage: LightningModule, datamodule, callbacks, loggers,
Trainer, fit (or resume), final validation -> one bundle with every stage's components. A single-stage
``model`` config (``model=audio``) is one stage; ``model=all`` lists several under ``model.stages`` (each
with optional ``trainer:`` overrides), run in order, stage 2 starting from this run's stage 1. Loggers are
always closed, also when training fails.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from aniportrait.bundle import export_bundle
from aniportrait.errors import AniPortraitError

__all__ = ["train", "print_metrics", "lookup_metric"]

log = logging.getLogger(__name__)

_STAGE_KEYS = ("loader", "trainer", "enabled")  # stage settings that are not LightningModule arguments


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [hydra.utils.instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def _module_config(stage_cfg: DictConfig) -> DictConfig:
    """The LightningModule's config: the stage config minus the datamodule and trainer settings."""
    plain = OmegaConf.to_container(stage_cfg, resolve=True)
    return OmegaConf.create({k: v for k, v in plain.items() if k not in _STAGE_KEYS})


def _stages(cfg: DictConfig) -> dict[str, DictConfig]:
    """The stages to run: ``model`` itself, or ``model.stages`` minus those with ``enabled: false``."""
    if "stages" in cfg.model:
        return {name: stage for name, stage in cfg.model.stages.items() if stage.get("enabled", True)}
    return {"model": cfg.model}


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


def lookup_metric(metrics: dict[str, float], name: str | None) -> float | None:
    """``name`` itself, or the first stage's ``<stage>/<name>`` in a multi-stage run."""
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    return next((value for key, value in metrics.items() if key.endswith(f"/{name}")), None)


def _fit_stage(cfg: DictConfig, name: str, stage_cfg: DictConfig, source, output_dir: Path, multi: bool,
               previous: dict[str, pl.LightningModule]) -> tuple[pl.LightningModule, dict[str, float], pl.Trainer,
                                                                 pl.LightningDataModule]:
    module = hydra.utils.instantiate(_module_config(stage_cfg), _recursive_=False)
    if previous and hasattr(module, "inherit"):  # e.g. the VAE of model=vae, stage 2's stage-1 weights
        module.inherit(previous)
    datamodule = hydra.utils.instantiate(stage_cfg.loader, source=source)
    trainer_cfg = OmegaConf.merge(cfg.trainer, stage_cfg.get("trainer") or {}, cfg.get("trainer_overrides") or {})
    callbacks_cfg = OmegaConf.create(OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True))
    loggers_cfg = OmegaConf.create(OmegaConf.to_container(cfg.get("logger") or {}, resolve=True))
    if multi:  # each stage keeps its own checkpoints and logs
        with open_dict(callbacks_cfg), open_dict(loggers_cfg):
            for entry in callbacks_cfg.values():
                if entry and "dirpath" in entry:
                    entry.dirpath = str(Path(entry.dirpath) / name)
            for entry in loggers_cfg.values():
                if entry and "version" in entry:
                    entry.version = name
        with open_dict(trainer_cfg):
            trainer_cfg.default_root_dir = str(output_dir / name)
    callbacks = _instantiate_all(callbacks_cfg)
    loggers = _instantiate_all(loggers_cfg)
    trainer: pl.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(resolved)
        trainer.fit(module, datamodule=datamodule, ckpt_path=None if multi else cfg.get("ckpt_path"))
        metrics = _final_metrics(trainer, module, datamodule)
    finally:
        for logger in loggers:
            logger.finalize("success")
            if isinstance(logger, pl.loggers.WandbLogger):
                import wandb

                wandb.finish()
    if multi:
        metrics = {f"{name}/{key}": value for key, value in metrics.items()}
    return module, metrics, trainer, datamodule


def _held_out_videos(cfg: DictConfig, module: pl.LightningModule, datamodule, trainer: pl.Trainer,
                     output_dir: Path) -> dict[str, float]:
    """``held_out_videos``: the last stage-B model re-animates the test clips (aniportrait/training/heldout.py)."""
    from aniportrait.training.heldout import held_out_video_metrics

    settings = OmegaConf.to_container(cfg.held_out_videos, resolve=True)
    if "test" not in getattr(datamodule, "datasets", {}):
        log.warning("held_out_videos: the dataset has no test clips; skipped")
        return {}
    log.info("held-out videos: generating the test clips")
    module.to(trainer.strategy.root_device)  # fit's teardown left it on the CPU
    try:
        return held_out_video_metrics(module, datamodule, output_dir, **settings)
    finally:
        module.cpu()


def _export(modules: dict[str, pl.LightningModule], out_dir: Path, provenance: dict) -> Path:
    components, state_dicts, settings, base_models = {}, {}, {}, {}
    for module in modules.values():
        parts = module.bundle_parts()
        components.update(parts[0])
        state_dicts.update(parts[1])
        settings.update(parts[2])
        base_models.update(parts[3])
    return export_bundle(out_dir, components, settings=settings, base_models=base_models, provenance=provenance,
                         state_dicts=state_dicts)


def train(cfg: DictConfig) -> tuple[dict[str, float], Path | None]:
    """Fit the configured stage(s); returns (final validation metrics, bundle path or None)."""
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))

    stages = _stages(cfg)
    multi = len(stages) > 1 or "stages" in cfg.model
    if multi and cfg.get("ckpt_path"):
        raise AniPortraitError("ckpt_path resumes one stage: run that stage alone (e.g. model=video_stage2 "
                               "model.stage1=BUNDLE ckpt_path=...), not model=all")
    source = hydra.utils.instantiate(cfg.data)
    trained: dict[str, pl.LightningModule] = {}
    metrics: dict[str, float] = {}
    trainer = video = None
    for name, stage_cfg in stages.items():
        log.info("training stage %s", name)
        module, stage_metrics, trainer, datamodule = _fit_stage(cfg, name, stage_cfg, source, output_dir, multi, trained)
        trained[name] = module
        metrics.update(stage_metrics)
        if hasattr(module, "sampling_pipeline"):
            video = (module, datamodule, trainer)
    if video is not None and cfg.get("held_out_videos") and trainer.is_global_zero:
        metrics.update(_held_out_videos(cfg, *video, output_dir))
    bundle = None
    if cfg.get("export", True) and trainer.is_global_zero:
        bundle = _export(trained, output_dir / "bundle", provenance={
            "run_dir": str(output_dir), "metrics": metrics, "stages": list(stages), "command": " ".join(sys.argv),
            "config": OmegaConf.to_container(cfg, resolve=True)})
    return metrics, bundle
