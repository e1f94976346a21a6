"""CUDA graphs for stage B's conditional prediction (``model.performance.cuda_graphs``).

At backbone=small's widths the stage-1 step is bound by the host, not the GPU: alone on an H200 it took 0.329 s,
sharing the GPU with a second run 0.297 s (benchmarks/README.md). Thousands of small kernels are launched one by one
from Python per step. A CUDA graph replays the forward and the backward of PoseGuider + ReferenceNet (writing the
reference bank) + denoising UNet (reading it) as two launches.

``torch.cuda.make_graphed_callables`` does the capture. The bank is written and read inside one captured forward, so
it needs no special handling. What stays eager:
- the frozen VAE and CLIP encodings, the noise, the loss and the optimizer;
- steps of a batch shape other than the captured one (a short last batch), logged once;
- reference-dropout steps, whose ReferenceNet is skipped, as officially (10 % of the steps);
- validation, which runs without gradients.

The captured forward runs under autocast without its weight cache, as the graphs require. The capture's warm-up
passes would move BatchNorm running statistics, so every buffer is restored afterwards: the first graphed step
computes what the eager step would. tests/training/test_video_performance.py compares the two on a GPU.

Gradient checkpointing (all levels or some, models/checkpointing.py) is captured too: the backward graph holds the
recomputed forward. Two things make that the eager step: the checkpointed layers run without saving and restoring
the RNG state (capture forbids reading the generator), which is the same function because they draw no random
numbers (dropout with p > 0 would be refused), and the reference bank stays filled until the backward has been
captured, since the recomputed attention reads it again.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpointing import (
    checkpoint_without_rng_state,
    random_modules,
    set_checkpoint_function,
)

__all__ = ["CUDA_GRAPH_CHOICES", "ConditionalPrediction", "GraphedPrediction", "conditional_prediction", "cuda_graph_problems",
           "use_cuda_graphs"]

log = logging.getLogger(__name__)


def conditional_prediction(pose_guider: nn.Module, reference_unet: nn.Module, denoising_unet: nn.Module,
                           reference_control: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           reference_latents: torch.Tensor, clip_embeds: torch.Tensor, pose_images: torch.Tensor,
                           reference_pose: torch.Tensor, uncond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising UNet's prediction (b, 4, f, h, w) with the reference: pose features, the ReferenceNet's pass into
    the bank, the denoising UNet reading it (``uncond_mask``: samples that read their own tokens only)."""
    pose_features = pose_guider(pose_images.transpose(1, 2), reference_pose)  # 5 x (b, C, f, h, w)
    reference_control.write()
    reference_unet(reference_latents, torch.zeros_like(timesteps), clip_embeds)
    reference_control.read(num_frames=noisy_latents.shape[2], uncond_mask=uncond_mask)
    return denoising_unet(noisy_latents, timesteps, clip_embeds, pose_cond_fea=pose_features).sample


class ConditionalPrediction(nn.Module):
    """:func:`conditional_prediction` as a module, the form ``make_graphed_callables`` captures (its parameters are
    the graph's). Never registered in the LightningModule: its submodules are the module's own networks."""

    def __init__(self, pose_guider: nn.Module, reference_unet: nn.Module, denoising_unet: nn.Module,
                 reference_control: Any):
        super().__init__()
        self.pose_guider, self.reference_unet, self.denoising_unet = pose_guider, reference_unet, denoising_unet
        self.reference_control = reference_control

    @property
    def recomputes(self) -> bool:
        """Whether a UNet recomputes checkpointed layers in the backward (which then reads the bank again)."""
        return self.reference_unet.is_gradient_checkpointing or self.denoising_unet.is_gradient_checkpointing

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        prediction = conditional_prediction(self.pose_guider, self.reference_unet, self.denoising_unet,
                                            self.reference_control, *inputs)
        if not self.recomputes:
            self.reference_control.clear()  # autograd keeps what backward needs; the bank's references can go
        return prediction


CUDA_GRAPH_CHOICES = (True, False, "auto")
CAPTURE_OPTIONS: dict[str, Any] = {"capture_error_mode": "thread_local"}


def cuda_graph_problems(*, device_type: str, strategy: str, compile_options: Any, accumulate_grad_batches: int,
                        gradient_checkpointing: bool, uncond_per_sample: bool,
                        random_modules: Sequence[str] = ()) -> list[str]:
    """What keeps a captured step from computing the eager step, each with the key to change (empty: nothing)."""
    problems = []
    if device_type != "cuda":
        problems.append(f"it needs a CUDA device (the trainer runs on {device_type}: use trainer=gpu)")
    if strategy != "SingleDeviceStrategy":
        problems.append(f"it runs on one device ({strategy}: use trainer.devices=1)")
    if compile_options not in (None, False):
        problems.append("model.performance.compile is set too (choose one; compile's mode=reduce-overhead also "
                        "uses CUDA graphs)")
    if accumulate_grad_batches != 1:
        problems.append(f"trainer.accumulate_grad_batches={accumulate_grad_batches}: the graph's gradient buffers are "
                        "rewritten by every replay (use 1 and a larger loader.batch_size)")
    if gradient_checkpointing and random_modules:
        problems.append(f"model.gradient_checkpointing recomputes layers that draw random numbers "
                        f"({', '.join(sorted(set(random_modules)))}), whose RNG state a graph cannot restore (set "
                        "the dropout to 0 or model.gradient_checkpointing to false)")
    if uncond_per_sample:
        problems.append("model.loss.uncond_per_sample=true drops the reference per sample, so almost every step "
                        "would run eagerly (set it to false, as officially)")
    return problems


def use_cuda_graphs(choice: Any, **settings: Any) -> bool:
    """``model.performance.cuda_graphs``: true (captured, or an error naming what prevents it), false, or auto (the
    default: captured wherever nothing prevents it, i.e. one CUDA device without compile; the
    choice is logged). The graphed step computes the eager one (the gpu test of tests/training/test_video_performance.py),
    so auto changes speed, never results."""
    if choice not in CUDA_GRAPH_CHOICES:
        raise AniPortraitError(f"model.performance.cuda_graphs={choice!r}: expected true, false or auto")
    if choice is False:
        return False
    problems = cuda_graph_problems(**settings)
    if choice is True and problems:
        raise AniPortraitError("model.performance.cuda_graphs=true cannot be used: " + "; ".join(problems))
    if problems:
        log.info("model.performance.cuda_graphs=auto: the eager step, because " + "; ".join(problems))
        return False
    log.info("model.performance.cuda_graphs=%s: the conditional prediction runs as CUDA graphs",
             "auto" if choice == "auto" else "true")
    return True


def _capture_options() -> dict[str, Any]:
    """CAPTURE_OPTIONS that this torch's make_graphed_callables takes (capture_error_mode is recent)."""
    accepted = inspect.signature(torch.cuda.make_graphed_callables).parameters
    return {key: value for key, value in CAPTURE_OPTIONS.items() if key in accepted}


class GraphedPrediction:
    """``ConditionalPrediction`` captured as CUDA graphs at the first call and replayed while the inputs keep
    that call's shapes and dtypes; other calls run it eagerly."""

    def __init__(self, pose_guider: nn.Module, reference_unet: nn.Module, denoising_unet: nn.Module,
                 reference_control: Any, autocast_dtype: torch.dtype | None, num_warmup_iters: int = 3):
        self.prediction = ConditionalPrediction(pose_guider, reference_unet, denoising_unet, reference_control)
        self.autocast_dtype = autocast_dtype
        self.num_warmup_iters = num_warmup_iters
        self._graphed: Callable[..., torch.Tensor] | None = None
        self._signature: tuple | None = None
        self._logged_eager: set[tuple] = set()
        self.replays = 0

    @staticmethod
    def _signature_of(inputs: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((tuple(tensor.shape), tensor.dtype, tensor.device) for tensor in inputs)

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, enabled=enabled, cache_enabled=False)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        # a separate module object: make_graphed_callables replaces the forward of the module it is given
        module = ConditionalPrediction(self.prediction.pose_guider, self.prediction.reference_unet,
                                       self.prediction.denoising_unet, self.prediction.reference_control)
        buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
        samples = tuple(tensor.detach().clone() for tensor in inputs)
        if module.recomputes:
            found = random_modules(module.reference_unet, module.denoising_unet)
            if found:  # use_cuda_graphs refuses these; a guard for callers that build this class themselves
                raise AniPortraitError(f"CUDA graphs with gradient checkpointing need layers without dropout: {found}")
            for unet in (module.reference_unet, module.denoising_unet):
                set_checkpoint_function(unet, checkpoint_without_rng_state)
        with self._autocast():
            # thread_local: only this thread's capture-unsafe calls count. In the default global mode a call such as
            # the loader's pin-memory thread allocating page-locked memory invalidates the capture (seen on an H200:
            # cuBLASLt then fails with CUBLAS_STATUS_EXECUTION_FAILED and the capture with
            # cudaErrorStreamCaptureInvalidated, in one of two runs sharing a GPU).
            self._graphed = torch.cuda.make_graphed_callables(module, samples, num_warmup_iters=self.num_warmup_iters,
                                                              allow_unused_input=True, **_capture_options())
        self.prediction.reference_control.clear()  # kept for the recomputation in the captured backward
        with torch.no_grad():  # the warm-up passes updated BatchNorm statistics: put them back, in place
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
        self._signature = self._signature_of(inputs)
        log.info("CUDA graphs captured for the conditional prediction: inputs %s",
                 [shape for shape, _, _ in self._signature])

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        signature = self._signature_of(inputs)
        if self._graphed is None:
            self._capture(inputs)
        if signature != self._signature:
            if signature not in self._logged_eager:
                self._logged_eager.add(signature)
                log.info("inputs %s differ from the captured %s: this step runs eagerly",
                         [shape for shape, _, _ in signature], [shape for shape, _, _ in self._signature])
            return self.prediction(*inputs)
        self.replays += 1
        with self._autocast():
            return self._graphed(*inputs)
