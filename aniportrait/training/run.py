"""The training recipe behind ``train.py``: build everything from the config, fit, validate, export.

Reads top to bottom: data source -> for each stage: LightningModule, datamodule, callbacks, loggers,
Trainer, fit (or resume), final validation -> one bundle with every stage's components. A single-stage
``model`` config (``model=audio``) is one stage; ``model=all`` lists several under ``model.stages`` (each
with optional ``trainer:`` overrides), run in order, stage 2 starting from this run's stage 1. Loggers are
always closed, also when training fails.

``trainer.*`` keys given on the command line win over every stage's own trainer settings. SIGINT/SIGTERM stop
after the current step with ``last.ckpt`` saved and one line saying how to continue: ``resume=RUN_DIR`` continues
every stage of that run in that folder (finished stages are restored, not retrained).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from aniportrait.bundle import export_bundle
from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpoints import read_training_checkpoint
from aniportrait.utils import values
from aniportrait.utils.signals import Interrupted, deferred_signals

__all__ = ["train", "print_metrics", "lookup_metric"]

log = logging.getLogger(__name__)

_STAGE_KEYS = ("loader", "trainer", "enabled")  # stage settings that are not LightningModule arguments
_RESUMED = time.strftime("resumed-%Y%m%d-%H%M%S")  # log version of a resumed run's part


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [hydra.utils.instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def _module_config(stage_cfg: DictConfig, video_overrides: DictConfig | None = None) -> DictConfig:
    """The LightningModule's config: the stage config minus the datamodule and trainer settings, with
    ``validation_video_overrides`` (e.g. debug=fast's) applied to its validation videos."""
    plain = OmegaConf.to_container(stage_cfg, resolve=True)
    module = {k: v for k, v in plain.items() if k not in _STAGE_KEYS}
    videos = (module.get("callbacks") or {}).get("validation_videos")
    if videos and video_overrides:
        videos.update({k: v for k, v in OmegaConf.to_container(video_overrides, resolve=True).items() if v is not None})
    return OmegaConf.create(module)


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


def _command_line_trainer(cfg: DictConfig) -> DictConfig:
    """The ``trainer.*`` keys given on the command line (``trainer.max_steps=3``): they win over the stages' own."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return OmegaConf.create({})
    keys = {override.partition("=")[0].lstrip("+").removeprefix("trainer.").split(".")[0]
            for override in HydraConfig.get().overrides.task
            if override.lstrip("+").startswith("trainer.") and "=" in override}
    return OmegaConf.create({key: cfg.trainer.get(key) for key in sorted(keys) if key in cfg.trainer})


def _stage_trainer(cfg: DictConfig, stage_cfg: DictConfig) -> DictConfig:
    """A stage's trainer settings: the trainer group, the stage's own, trainer_overrides, the command line's. A stage
    may set any Trainer argument (``+model.stages.video_stage1.trainer.profiler=simple``), not only the group's."""
    base = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))  # not struct: stage keys may be new
    return OmegaConf.merge(base, stage_cfg.get("trainer") or {}, cfg.get("trainer_overrides") or {},
                           _command_line_trainer(cfg))


def _check_trainer(trainer_cfg: DictConfig) -> None:
    """The step and interval settings every run uses, checked before anything is built."""
    values.integer("trainer.max_steps", trainer_cfg.get("max_steps", -1), minimum=-1, hint=" (-1: no limit)")
    if trainer_cfg.get("max_epochs") is not None:
        values.integer("trainer.max_epochs", trainer_cfg.max_epochs, minimum=-1, hint=" (-1: no limit)")
    interval = trainer_cfg.get("val_check_interval")
    if interval is not None and not (isinstance(interval, float) and 0 < interval <= 1):
        values.integer("trainer.val_check_interval", interval, minimum=1, hint=" (steps), or a fraction of an epoch in (0, 1]")
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if trainer_cfg.get(key) is not None:
            values.integer(f"trainer.{key}", trainer_cfg[key], minimum=1)
    if trainer_cfg.get("gradient_clip_val") is not None:
        values.number("trainer.gradient_clip_val", trainer_cfg.gradient_clip_val, minimum=0)


def _check_loader(name: str, loader: DictConfig | None) -> None:
    """The counts of a stage's datamodule (batch sizes, workers, windows), checked before anything is built."""
    prefix = "model.loader" if name == "model" else f"model.stages.{name}.loader"
    for key, minimum in (("batch_size", 1), ("eval_batch_size", 1), ("num_workers", 0), ("samples_per_epoch", 1),
                         ("window_frames", 1), ("eval_window_frames", 1), ("n_sample_frames", 1)):
        if loader is not None and loader.get(key) is not None:
            values.integer(f"{prefix}.{key}", loader[key], minimum=minimum)


def _last_checkpoint(trainer: pl.Trainer) -> Path | None:
    checkpoint = trainer.checkpoint_callback
    return Path(checkpoint.dirpath) / "last.ckpt" if checkpoint is not None and checkpoint.dirpath else None


def _fit_stage(cfg: DictConfig, name: str, stage_cfg: DictConfig, source, output_dir: Path, multi: bool,
               previous: dict[str, pl.LightningModule]) -> tuple[pl.LightningModule, dict[str, float], pl.Trainer,
                                                                 pl.LightningDataModule]:
    module = hydra.utils.instantiate(_module_config(stage_cfg, cfg.get("validation_video_overrides")),
                                     _recursive_=False)
    if previous and hasattr(module, "inherit"):  # e.g. the VAE of model=vae, stage 2's stage-1 weights
        module.inherit(previous)
    datamodule = hydra.utils.instantiate(stage_cfg.loader, source=source)
    trainer_cfg = _stage_trainer(cfg, stage_cfg)
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
    if cfg.get("resume"):  # the stopped part's logs stay as they are; the resumed part logs beside them
        with open_dict(loggers_cfg):
            for entry in loggers_cfg.values():
                if entry and "version" in entry:
                    entry.version = "-".join(filter(None, [str(entry.version or ""), _RESUMED]))
    callbacks = _instantiate_all(callbacks_cfg)
    loggers = _instantiate_all(loggers_cfg)
    trainer: pl.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    ckpt_path = cfg.get("ckpt_path")
    last = _last_checkpoint(trainer)
    if cfg.get("resume"):  # this stage's last.ckpt in the resumed run folder, if it got that far
        ckpt_path = str(last) if last is not None and last.is_file() else None
        if ckpt_path:
            read_training_checkpoint(ckpt_path, key=f"resume ({name})")
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(resolved)
        with deferred_signals() as stop:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            if stop.signal:  # it arrived during the last step: the stage finished, stop before the next one
                raise Interrupted(stop.signal)
            metrics = _final_metrics(trainer, module, datamodule)
    except (SIGTERMException, Interrupted) as error:
        kept = f"{last} (stage {name}, step {trainer.global_step})" if last is not None and last.is_file() else \
            f"no checkpoint of stage {name} yet"
        raise Interrupted(getattr(error, "signal_name", None), kept=kept) from error
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


def _export(modules: dict[str, pl.LightningModule], out_dir: Path, provenance: dict, overwrite: bool = False) -> Path:
    components, state_dicts, settings, base_models = {}, {}, {}, {}
    for module in modules.values():
        parts = module.bundle_parts()
        components.update(parts[0])
        state_dicts.update(parts[1])
        settings.update(parts[2])
        base_models.update(parts[3])
    return export_bundle(out_dir, components, settings=settings, base_models=base_models, provenance=provenance,
                         state_dicts=state_dicts, overwrite=overwrite)


def _check_run_folder(cfg: DictConfig, output_dir: Path, multi: bool) -> None:
    """A run writes into a folder of its own: one that already holds checkpoints or a bundle is another run's,
    continued only with resume= (or replaced with overwrite=true)."""
    if multi and cfg.get("ckpt_path"):
        raise AniPortraitError("ckpt_path resumes one stage: continue a model=all run with resume=RUN_DIR, or run "
                               "that stage alone (e.g. model=video_stage2 model.stage1=BUNDLE ckpt_path=...)")
    if cfg.get("resume"):
        if cfg.get("ckpt_path"):
            raise AniPortraitError("give either resume=RUN_DIR (every stage of that run) or ckpt_path=CKPT, not both")
        if Path(str(cfg.resume)).expanduser().resolve() != output_dir.resolve():
            raise AniPortraitError(f"resume={cfg.resume} continues in that folder, but this run writes to {output_dir}; "
                                   "start it as `python train.py resume=RUN_DIR` (train.py sets the folder)")
        if (output_dir / "bundle").exists() and cfg.get("export", True) and not cfg.get("overwrite"):
            raise AniPortraitError(f"the run in {output_dir} has finished (it holds bundle/): nothing to resume; add "
                                   "overwrite=true to train its stages on and export the bundle again")
        return
    if pl.utilities.rank_zero.rank_zero_only.rank != 0:  # DDP's other processes share rank 0's run folder
        return
    taken = [path for path in (output_dir / "bundle", output_dir / "checkpoints") if path.exists()]
    if taken and not cfg.get("overwrite"):
        raise AniPortraitError(f"{output_dir} already holds {taken[0].name}/ of another run; continue it with "
                               f"resume={output_dir}, add overwrite=true to replace it, or choose another hydra.run.dir")


def train(cfg: DictConfig) -> tuple[dict[str, float], Path | None]:
    """Fit the configured stage(s); returns (final validation metrics, bundle path or None)."""
    output_dir = Path(cfg.paths.output_dir)
    stages = _stages(cfg)
    multi = len(stages) > 1 or "stages" in cfg.model
    _check_run_folder(cfg, output_dir, multi)
    values.integer("seed", cfg.seed, minimum=0, maximum=2**32 - 1)
    for name, stage_cfg in stages.items():
        _check_trainer(_stage_trainer(cfg, stage_cfg))
        _check_loader(name, stage_cfg.get("loader"))
    if cfg.get("ckpt_path"):
        read_training_checkpoint(cfg.ckpt_path)  # a missing or truncated checkpoint is one error, before any work
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))

    source = hydra.utils.instantiate(cfg.data)
    trained: dict[str, pl.LightningModule] = {}
    metrics: dict[str, float] = {}
    trainer = video = None
    for name, stage_cfg in stages.items():
        log.info("training stage %s", name)
        try:
            module, stage_metrics, trainer, datamodule = _fit_stage(cfg, name, stage_cfg, source, output_dir, multi,
                                                                    trained)
        except Interrupted as error:
            finished = f"; finished stages: {', '.join(trained)}" if trained else ""
            raise Interrupted(error.signal_name, kept=f"{error.kept or f'no checkpoint of stage {name} yet'}{finished}",
                              resume=shlex.join(["python", "train.py", f"resume={output_dir}"])) from error
        trained[name] = module
        metrics.update(stage_metrics)
        if hasattr(module, "sampling_pipeline"):
            video = (module, datamodule, trainer)
    if video is not None and cfg.get("held_out_videos") and trainer.is_global_zero:
        metrics.update(_held_out_videos(cfg, *video, output_dir))
    bundle = None
    if cfg.get("export", True) and trainer.is_global_zero:
        try:
            bundle = _export(trained, output_dir / "bundle", overwrite=bool(cfg.get("overwrite")), provenance={
                "run_dir": str(output_dir), "metrics": metrics, "stages": list(stages), "command": " ".join(sys.argv),
                "config": OmegaConf.to_container(cfg, resolve=True)})
        except Interrupted as error:
            raise Interrupted(error.signal_name, kept=f"every stage's last.ckpt under {output_dir} (no bundle yet)",
                              resume=shlex.join(["python", "train.py", f"resume={output_dir}"])) from error
    return metrics, bundle
