"""Stage A training: Audio2Mesh and Audio2Pose as one LightningModule.

Either model or both (``components``), each with its own wav2vec2 encoder as in the official release,
optimised together. Targets:

* Audio2Mesh: per-frame mesh offsets from the clip's reference mesh; L1 (what the official authors say
  they used) with optional extra weight on the lip vertices, plus an L1 velocity term.
* Audio2Pose: teacher-forced 6-D poses relative to the window's first frame, identity index from the
  manifest; L1 plus velocity.

Validation (on whole windows of the validation clips): LVE, mean vertex error, mouth-opening Pearson
correlation with the ground truth (pooled over frames), and pose L1 of free-running autoregressive
decoding (plus the teacher-forced L1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from aniportrait.bundle import export_bundle, load_component_weights
from aniportrait.face.topology import LIP_VERTICES
from aniportrait.metrics.landmarks import lip_vertex_error, mean_vertex_error, mouth_opening, pose_l1
from aniportrait.models.audio2mesh import Audio2Mesh
from aniportrait.models.audio2pose import Audio2Pose
from aniportrait.models.wav2vec2 import build_wav2vec2, wav2vec2_config_from_backbone
from aniportrait.pipelines.landmarks import predict_poses_chunked
from aniportrait.training.schedules import with_scheduler

__all__ = ["AudioLandmarkModule"]

log = logging.getLogger(__name__)


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class AudioLandmarkModule(pl.LightningModule):
    def __init__(
        self,
        components: list[str] = ("audio2mesh", "audio2pose"),
        backbone: dict | None = None,
        audio2mesh: dict | None = None,
        audio2pose: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        loss: dict | None = None,
        init: dict | None = None,
        train_feature_encoder: bool = False,
        inference: dict | None = None,
    ):
        super().__init__()
        components = list(_plain(components))
        unknown = set(components) - {"audio2mesh", "audio2pose"}
        if unknown or not components:
            raise ValueError(f"model.components must be a non-empty subset of [audio2mesh, audio2pose], got {components}")
        self.save_hyperparameters({
            "components": components, "backbone": _plain(backbone) or {}, "audio2mesh": _plain(audio2mesh) or {},
            "audio2pose": _plain(audio2pose) or {}, "optimizer": _plain(optimizer) or {},
            "scheduler": _plain(scheduler), "loss": _plain(loss) or {}, "init": _plain(init) or {},
            "train_feature_encoder": bool(train_feature_encoder), "inference": _plain(inference) or {},
        })
        wav2vec2_config, _ = wav2vec2_config_from_backbone(self.hparams.backbone)
        config_dict = {k: v for k, v in wav2vec2_config.to_dict().items() if not k.startswith("_")}
        self.audio2mesh = Audio2Mesh(wav2vec2_config=config_dict, **self.hparams.audio2mesh) if "audio2mesh" in components else None
        self.audio2pose = Audio2Pose(wav2vec2_config=config_dict, **self.hparams.audio2pose) if "audio2pose" in components else None
        if train_feature_encoder:
            for model in self._models().values():
                model.audio_encoder.feature_extractor._requires_grad = True
                model.audio_encoder.feature_extractor.requires_grad_(True)
        loss = self.hparams.loss
        weights = torch.ones(468)
        weights[list(LIP_VERTICES)] = float(loss.get("mouth_weight", 1.0))
        self.register_buffer("vertex_weights", weights.repeat_interleave(3), persistent=False)
        self.data_settings: dict = {}  # fps, identities, mesh_reference: filled from the datamodule
        self._weights_initialised = False
        self._val = {}
        self.last_validated_step = -1

    def _models(self) -> dict[str, torch.nn.Module]:
        return {name: model for name, model in (("audio2mesh", self.audio2mesh), ("audio2pose", self.audio2pose)) if model is not None}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "identities", None):
            self.data_settings = {
                "fps": float(datamodule.fps),
                "identities": dict(datamodule.identities),
                "mesh_reference": datamodule.mesh_reference,
                "window_frames": int(datamodule.window_frames),
            }
        if stage == "fit" and not self._weights_initialised:
            self._initialise_weights()
        self._weights_initialised = True

    def _initialise_weights(self) -> None:
        """Fine-tuning sources (official .pt, a bundle) win over pretrained wav2vec2 weights."""
        init = self.hparams.init or {}
        _, pretrained = wav2vec2_config_from_backbone(self.hparams.backbone)
        for name, model in self._models().items():
            source = init.get(name)
            if source:
                load_component_weights(model, source, name)
                log.info("%s initialised from %s", name, source)
            elif pretrained:
                encoder = build_wav2vec2(self.hparams.backbone)
                missing, unexpected = model.audio_encoder.load_state_dict(encoder.state_dict(), strict=False)
                if missing or unexpected:
                    raise RuntimeError(f"wav2vec2 weights from {pretrained} do not fit: missing {missing}, unexpected {unexpected}")
                log.info("%s audio encoder initialised from %s", name, pretrained)

    # ------------------------------------------------------------------ losses
    def _masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the masked frames of the GLOBAL batch: under DDP the count is summed over processes,
        so padded windows weigh the same as in one process with the whole batch."""
        mask = mask.to(values.dtype)
        count = mask.sum()
        if self.training and self._trainer is not None and self.trainer.world_size > 1:
            count = self.all_gather(count.detach()).sum() / self.trainer.world_size
        return (values * mask).sum() / count.clamp(min=1.0)

    def _mesh_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mesh, reference = batch["mesh"], batch["reference_mesh"]
        frames = mesh.shape[1]
        target = (mesh - reference[:, None]).flatten(2)  # (B, W, 1404)
        audio_mask = None if bool(batch["audio_mask"].all()) else batch["audio_mask"]
        pred = self.audio2mesh(batch["audio"], frames, frame_mask=audio_mask)  # (B, W, 1404)
        weights = self.vertex_weights
        per_frame = ((pred - target).abs() * weights).sum(-1) / weights.sum()
        mask = batch["frame_mask"]
        l1 = self._masked_mean(per_frame, mask)
        velocity = ((pred[:, 1:] - pred[:, :-1]) - (target[:, 1:] - target[:, :-1])).abs()
        velocity = self._masked_mean((velocity * weights).sum(-1) / weights.sum(), mask[:, 1:] & mask[:, :-1])
        return l1, velocity, pred

    def _pose_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        poses = batch["poses"]
        audio_mask = None if bool(batch["audio_mask"].all()) else batch["audio_mask"]
        pred = self.audio2pose(batch["audio"], poses, batch["identity"], frame_mask=audio_mask)  # (B, W, 6)
        component = pred.new_tensor(self.hparams.loss.get("pose_component_weights", [1.0] * 6))
        mask = batch["frame_mask"]
        l1 = self._masked_mean(((pred - poses).abs() * component).mean(-1), mask)
        velocity = ((pred[:, 1:] - pred[:, :-1]) - (poses[:, 1:] - poses[:, :-1])).abs() * component
        velocity = self._masked_mean(velocity.mean(-1), mask[:, 1:] & mask[:, :-1])
        return l1, velocity, pred

    def training_step(self, batch, batch_idx):
        loss_cfg = self.hparams.loss
        total = 0.0
        batch_size = batch["audio"].shape[0]
        if self.audio2mesh is not None:
            l1, velocity, _ = self._mesh_terms(batch)
            mesh_loss = l1 + loss_cfg.get("velocity_weight", 1.0) * velocity
            total = total + loss_cfg.get("mesh_weight", 1.0) * mesh_loss
            self.log_dict({"train/mesh_l1": l1, "train/mesh_velocity": velocity}, batch_size=batch_size)
        if self.audio2pose is not None:
            l1, velocity, _ = self._pose_terms(batch)
            pose_loss = l1 + loss_cfg.get("pose_velocity_weight", 1.0) * velocity
            total = total + loss_cfg.get("pose_weight", 1.0) * pose_loss
            self.log_dict({"train/pose_l1": l1, "train/pose_velocity": velocity}, batch_size=batch_size)
        # sync_dist: under DDP the logged loss is the global-batch mean, comparable with one process
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size, sync_dist=True)
        return total

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {key: torch.zeros((), dtype=torch.float64, device=self.device)
                     for key in ("frames", "lve", "mve", "mesh_l1", "pose_l1", "pose_l1_teacher",
                                 "n", "sx", "sy", "sxx", "syy", "sxy")}
        self.preview = None

    def validation_step(self, batch, batch_idx):
        mask = batch["frame_mask"]
        frames = mask.sum().to(torch.float64)
        stats = self._val
        stats["frames"] += frames
        if self.audio2mesh is not None:
            l1, _, offsets = self._mesh_terms(batch)
            pred_mesh = batch["reference_mesh"][:, None] + offsets.view(*batch["mesh"].shape)
            stats["mesh_l1"] += l1.double() * frames
            stats["lve"] += lip_vertex_error(pred_mesh, batch["mesh"], mask).double() * frames
            stats["mve"] += mean_vertex_error(pred_mesh, batch["mesh"], mask).double() * frames
            x = mouth_opening(pred_mesh)[mask].double()
            y = mouth_opening(batch["mesh"])[mask].double()
            for key, value in (("n", float(x.numel())), ("sx", x.sum()), ("sy", y.sum()), ("sxx", (x * x).sum()),
                               ("syy", (y * y).sum()), ("sxy", (x * y).sum())):
                stats[key] += value
            if self.preview is None:
                self.preview = {"pred_mesh": pred_mesh[0].detach().cpu(), "batch": {k: v[0].detach().cpu() for k, v in batch.items()}}
        if self.audio2pose is not None:
            l1, _, _ = self._pose_terms(batch)
            stats["pose_l1_teacher"] += l1.double() * frames
            inference = self.bundle_settings()["audio"]["pose"]
            free = predict_poses_chunked(self.audio2pose, batch["audio"], batch["poses"].shape[1], batch["identity"],
                                         self.data_settings.get("fps", 30.0), inference["chunk_frames"],
                                         inference["context_frames"])
            free = torch.as_tensor(free, dtype=batch["poses"].dtype, device=batch["poses"].device)
            stats["pose_l1"] += pose_l1(free, batch["poses"], mask).double() * frames
            if self.preview is not None and "pred_poses" not in self.preview:
                self.preview["pred_poses"] = free[0].detach().cpu()

    def on_validation_epoch_end(self) -> None:
        stats = {k: self.all_gather(v).sum() if self.trainer.world_size > 1 else v for k, v in self._val.items()}
        frames = stats["frames"].clamp(min=1.0)
        metrics = {}
        if self.audio2mesh is not None:
            n = stats["n"].clamp(min=1.0)
            cov = stats["sxy"] / n - stats["sx"] * stats["sy"] / n**2
            var_x = stats["sxx"] / n - (stats["sx"] / n) ** 2
            var_y = stats["syy"] / n - (stats["sy"] / n) ** 2
            denominator = torch.sqrt(var_x.clamp(min=0) * var_y.clamp(min=0))
            corr = cov / denominator if float(denominator) > 1e-12 else torch.zeros_like(cov)
            metrics.update({"val/lve": stats["lve"] / frames, "val/mve": stats["mve"] / frames,
                            "val/mesh_l1": stats["mesh_l1"] / frames, "val/mouth_open_corr": corr})
        if self.audio2pose is not None:
            metrics.update({"val/pose_l1": stats["pose_l1"] / frames, "val/pose_l1_teacher": stats["pose_l1_teacher"] / frames})
        metrics["val/loss"] = sum(metrics.get(k, 0.0) for k in ("val/mesh_l1", "val/pose_l1_teacher"))
        self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(self.hparams.optimizer, params=parameters)
        return with_scheduler(self, optimizer, self.hparams.scheduler)

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["aniportrait"] = {"module_class": f"{type(self).__module__}.{type(self).__qualname__}",
                                     "data_settings": self.data_settings}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.data_settings = dict(checkpoint.get("aniportrait", {}).get("data_settings", {}))
        self._weights_initialised = True  # the checkpoint holds the weights

    def bundle_settings(self) -> dict:
        inference = self.hparams.inference or {}
        data = self.data_settings
        return {
            "audio": {
                "fps": data.get("fps", 30.0),
                "sample_rate": 16000,
                "mesh_reference": data.get("mesh_reference", "neutral"),
                "pose": {
                    "relative_to": "window_start",
                    "rotation_scale": float(inference.get("rotation_scale", 1.0)),
                    "smooth_window": int(inference.get("pose_smooth_window", 7)),
                    "chunk_frames": int(inference.get("pose_chunk_frames", max(data.get("window_frames", 150), 30))),
                    "context_frames": int(inference.get("pose_context_frames", 10)),
                    "identities": data.get("identities", {}),
                    "default_identity": int(inference.get("default_identity", 0)),
                },
            }
        }

    def bundle_parts(self) -> tuple[dict, dict, dict, dict]:
        """(components, state_dicts, settings, base_models) for :func:`aniportrait.bundle.export_bundle`."""
        _, pretrained = wav2vec2_config_from_backbone(self.hparams.backbone)
        base_models = {"wav2vec2": pretrained or "random-init (config in the component)"}
        return self._models(), {}, self.bundle_settings(), base_models

    def export(self, out_dir: str | Path, provenance: dict | None = None) -> Path:
        components, state_dicts, settings, base_models = self.bundle_parts()
        return export_bundle(out_dir, components, settings=settings, base_models=base_models, provenance=provenance,
                             state_dicts=state_dicts)
