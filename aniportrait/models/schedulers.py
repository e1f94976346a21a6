"""The sampling schedulers stage B is trained and sampled with: the official inference_v2 DDIM settings and a
builder for any diffusers scheduler from a ``_target_`` config (bundles record these configs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from aniportrait.errors import AniPortraitError

__all__ = ["INFERENCE_V2_SCHEDULER", "build_scheduler"]

# configs/inference/inference_v2.yaml noise_scheduler_kwargs, sampler DDIM
INFERENCE_V2_SCHEDULER: dict[str, Any] = {
    "_target_": "diffusers.DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def build_scheduler(config: Mapping[str, Any] | None = None) -> SchedulerMixin:
    """A diffusers scheduler from ``{_target_: diffusers.<Scheduler>, **kwargs}`` (None: :data:`INFERENCE_V2_SCHEDULER`)."""
    config = dict(INFERENCE_V2_SCHEDULER if config is None else config)
    if "_target_" not in config:
        raise AniPortraitError(f"scheduler config {config} has no _target_: name a diffusers scheduler, "
                               "e.g. _target_: diffusers.DDIMScheduler")
    scheduler = hydra.utils.instantiate(config)
    if not isinstance(scheduler, SchedulerMixin):
        raise AniPortraitError(f"scheduler _target_ {config['_target_']!r} built a {type(scheduler).__name__}, "
                               "not a diffusers scheduler")
    return scheduler
