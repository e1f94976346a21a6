"""Training callbacks: things a person looks at while a run trains."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from aniportrait.face.drawing import draw_landmark_sequence
from aniportrait.face.geometry import pose6_to_matrix, project_points
from aniportrait.metrics.landmarks import mouth_opening

__all__ = ["LandmarkPreviews", "ResumableRandomState", "ResumableModelCheckpoint"]

log = logging.getLogger(__name__)

# A frontal camera 45 cm in front of the canonical face: previews do not depend on any clip's camera.
_PREVIEW_CAMERA = pose6_to_matrix(np.array([0.0, 0.0, 0.0, 0.0, 0.0, -45.0]))


class LandmarkPreviews(pl.Callback):
    """After each validation: the first validation window as a video (predicted | ground-truth pose
    images, with the window's audio) and a plot of mouth opening over time; files under ``out_dir``,
    also logged to Weights & Biases when that logger is active."""

    def __init__(self, out_dir: str, size: int = 256):
        self.out_dir = Path(out_dir)
        self.size = size

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        preview = getattr(pl_module, "preview", None)
        if trainer.sanity_checking or not trainer.is_global_zero or not preview:
            return
        from aniportrait.data.video import write_video

        step = trainer.global_step
        batch = preview["batch"]
        mask = batch["frame_mask"].numpy()
        frames = int(batch["audio_mask"].sum())
        true_mesh = batch["mesh"].numpy()[:frames]
        pred_mesh = preview["pred_mesh"].numpy()[:frames]
        true_poses = batch["poses"].numpy()[:frames]
        pred_poses = preview.get("pred_poses", batch["poses"]).numpy()[:frames]
        size = (self.size, self.size)
        left = draw_landmark_sequence(project_points(pred_mesh, _PREVIEW_CAMERA, pred_poses, size), size)
        right = draw_landmark_sequence(project_points(true_mesh, _PREVIEW_CAMERA, true_poses, size), size)
        audio = batch["audio"].numpy()
        audio = audio / max(float(np.abs(audio).max()), 1e-6) * 0.5
        fps = float(getattr(pl_module, "data_settings", {}).get("fps", 30.0))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        video_path = write_video(self.out_dir / f"step_{step:06d}.mp4", np.concatenate([left, right], axis=2), fps,
                                 audio=audio[: round(frames * 16000 / fps)], preset="veryfast")
        plot_path = self._plot(step, mouth_opening(pred_mesh), mouth_opening(true_mesh), mask[:frames], fps)
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                import wandb

                logger.experiment.log({"preview/video": wandb.Video(str(video_path), format="mp4"),
                                       "preview/mouth": wandb.Image(str(plot_path))}, step=step)

    def _plot(self, step: int, predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray, fps: float) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        seconds = np.arange(len(truth)) / fps
        figure, axis = plt.subplots(figsize=(8, 2.5), dpi=100)
        axis.plot(seconds, np.where(mask, truth, np.nan), label="ground truth", color="black")
        axis.plot(seconds, np.where(mask, predicted, np.nan), label="predicted", color="tab:red")
        axis.set_xlabel("seconds")
        axis.set_ylabel("inner-lip gap (cm)")
        axis.set_title(f"mouth opening, step {step}")
        axis.legend(loc="upper right")
        figure.tight_layout()
        path = self.out_dir / f"step_{step:06d}_mouth.png"
        figure.savefig(path)
        plt.close(figure)
        return path


class ResumableRandomState(pl.Callback):
    """Save the random generators (torch, CUDA, numpy, Python) with each checkpoint and restore them at the
    first training batch after a resume, so a resumed run draws the same dropout and SpecAugment masks as
    an uninterrupted one. Restoring at the batch, not at load, skips the draws Lightning makes in between
    (a new dataloader iterator takes a seed)."""

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(state["python"])



class ResumableModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is where training stopped: at the end of every fit (so a finished stage
    of a multi-stage run resumes as finished even when max_steps is no multiple of the checkpoint interval) and when
    a SIGINT/SIGTERM stopped it (Lightning stops after a step, so that state is consistent)."""

    def _save_last_here(self, trainer: pl.Trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last_here(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save_last_here(trainer)
        else:
            super().on_exception(trainer, pl_module, exception)
