"""Stage-B training step speed and memory with the full SD-1.5 architecture (random init, no downloads).

Stage 1: batch 4 single frames at 512x512 (ReferenceNet + denoising UNet 2-D + PoseGuider train).
Stage 2: batch 1 x 16 frames at 512x512 (motion modules train). Each in bf16 mixed precision, without and with
gradient checkpointing, through the real LightningModules and a Lightning Trainer (gradient clipping 1.0 as the
recipe; the optimizer of the ``default`` variants is what ``model.eight_bit_adam`` and the module decide, the
others name torch's AdamW, fused or not; recorded in the results). The step time is the
median over the repeats after warm-up, measured with CUDA events from batch start to batch end (forward, backward,
optimizer); the peak memory is ``torch.cuda.max_memory_allocated`` over the run. Inputs are fixed random tensors
(loader speed is benchmarks/loader_speed.py). An out-of-memory run is recorded as such. Writes
benchmarks/results/video_train_step.json.

    python benchmarks/video_train_step.py                  # GPU: SD-1.5 shapes (writes a random backbone once)
    python benchmarks/video_train_step.py --tiny           # CPU smoke test: tiny backbone at 64x64
    python benchmarks/video_train_step.py --small --variants plain,cuda_graphs --checkpointing off \
        --stage1-batch 32 --stage2-batch 4                  # GPU: backbone=small at 256 px (the learning runs)

Variants with CUDA graphs (``model.performance.cuda_graphs``) capture the checkpointed recomputation too.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from video_bench_setup import random_sd15_backbone

from aniportrait.models.checkpointing import set_gradient_checkpointing
from aniportrait.training.video import VideoStage1Module, VideoStage2Module

RESULTS = Path(__file__).parent / "results" / "video_train_step.json"


class FixedSamples(Dataset):
    """The same random training sample at every index (the layout VideoFrameDataset produces)."""

    def __init__(self, frames: int, size: int, clip_size: int, cached_embed_dim: int | None = None):
        """``cached_embed_dim``: the layout of ``model.loader.latent_cache`` instead (posteriors and CLIP embeddings
        of that width in place of pixels): the step without the VAE encoder and the image encoder."""
        generator = torch.Generator().manual_seed(0)
        self.sample = {
            "pose_images": torch.rand(frames, 3, size, size, generator=generator) * 2 - 1,
            "reference_pose": torch.rand(3, size, size, generator=generator) * 2 - 1,
        }
        if cached_embed_dim is None:
            self.sample.update({
                "pixel_values": torch.rand(frames, 3, size, size, generator=generator) * 2 - 1,
                "reference_image": torch.rand(3, size, size, generator=generator) * 2 - 1,
                "clip_image": torch.randn(3, clip_size, clip_size, generator=generator)})
        else:
            latent = (4, size // 8, size // 8)
            self.sample.update({
                "latent_mean": torch.randn(frames, *latent, generator=generator),
                "latent_std": torch.rand(frames, *latent, generator=generator) * 0.1,
                "reference_latent_mean": torch.randn(*latent, generator=generator),
                "reference_latent_std": torch.rand(*latent, generator=generator) * 0.1,
                "clip_embeds": torch.randn(cached_embed_dim, generator=generator)})

    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.sample, "sample_index": torch.tensor(index)}


class StepTimer(pl.Callback):
    """Step times from batch start to batch end: CUDA events on GPU, wall clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[Any] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append([self._mark(), None])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.marks[-1][1] = self._mark()

    def seconds(self) -> list[float]:
        if not self.cuda:
            return [end - start for start, end in self.marks]
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1000 for start, end in self.marks]


class StepAnalysis(pl.Callback):
    """On two warm-up steps (never timed): the FLOPs of one step (torch.utils.flop_counter, forward + backward)
    and the CUDA kernels it launches (torch.profiler), with the ops that take most GPU time."""

    def __init__(self, flops_step: int | None, profile_step: int | None):
        self.flops_step, self.profile_step = flops_step, profile_step
        self.flops: int | None = None
        self.kernels: dict[str, Any] | None = None
        self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.flops_step:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()
        elif batch_idx == self.profile_step:
            self._mode = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA])
            self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._mode is None:
            return
        mode, self._mode = self._mode, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        mode.__exit__(None, None, None)
        if batch_idx == self.flops_step:
            self.flops = int(mode.get_total_flops())
        else:
            events = [e for e in mode.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            table = mode.key_averages().table(sort_by="cuda_time_total", row_limit=15)
            self.kernels = {"kernels_per_step": len(events),
                            "gpu_busy_ms": round(sum(e.device_time for e in events) / 1000, 1),
                            "top_ops": table.splitlines()}


def matmul_ceiling(device: str) -> float | None:
    """Measured bf16 matrix-product rate (TFLOP/s) of this GPU: 8192^3, median of 10 after warm-up."""
    if device != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for index in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if index >= 3:
            times.append(start.elapsed_time(end) / 1000)
    return round(2 * 8192**3 / statistics.median(times) / 1e12, 1)


def run(module: pl.LightningModule, frames: int, batch_size: int, size: int, clip_size: int,
        checkpointing: bool | tuple[int, ...],
        args: argparse.Namespace, variant: str = "plain") -> dict[str, Any]:
    cuda = args.device == "cuda"
    for unet in (module.reference_unet, module.denoising_unet):
        set_gradient_checkpointing(unet, checkpointing)
    if module.performance["cuda_graphs"] == "auto" and module.performance["compile"] is None:
        # auto decides at setup from the checkpointing in force: decide again for this run's setting
        module._performance_applied, module._graphed_prediction = False, None
    cached = module.frozen.image_encoder.config.projection_dim if VARIANTS[variant].get("cached_latents") else None
    loader = DataLoader(FixedSamples(frames, size, clip_size, cached), batch_size=batch_size, num_workers=2,
                        pin_memory=cuda, persistent_workers=True)
    timer = StepTimer(cuda)
    analysis = StepAnalysis(flops_step=args.warmup - 2 if args.flops else None,
                            profile_step=args.warmup - 1 if args.profile else None)
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision,
                         max_steps=args.warmup + args.repeats, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer, analysis])
    result: dict[str, Any] = {"variant": variant, "cached_latents": cached is not None, "stage": module.stage,
                              "batch_size": batch_size, "frames": frames, "size": size,
                              "gradient_checkpointing": checkpointing, "precision": args.precision,
                              "performance": dict(module.performance)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, train_dataloaders=loader)
    except torch.cuda.OutOfMemoryError as error:
        result.update(status="out of memory", error=str(error).splitlines()[0])
    else:
        seconds = timer.seconds()[args.warmup:]
        median = statistics.median(seconds)
        optimizer = trainer.optimizers[0]
        result.update(status="ok", step_seconds_median=round(median, 4), step_seconds_min=round(min(seconds), 4),
                      samples_per_s=round(batch_size / median, 2), frames_per_s=round(batch_size * frames / median, 2),
                      optimizer=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
                      optimizer_fused=bool(optimizer.defaults.get("fused")), repeats=len(seconds),
                      performance_resolved=dict(module.performance),  # auto settings as the module chose them
                      compile_and_warmup_seconds=round(sum(timer.seconds()[:args.warmup]), 1),
                      cuda_graph_replays=getattr(module._graphed_prediction, "replays", 0))  # auto: were they used?
        if analysis.flops:
            result.update(tflop_per_step=round(analysis.flops / 1e12, 3),
                          achieved_tflops=round(analysis.flops / median / 1e12, 1))
            if args.ceiling:
                result["mfu"] = round(analysis.flops / median / 1e12 / args.ceiling, 3)
        if analysis.kernels:
            result.update(analysis.kernels)
    if cuda:
        result.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    module.reference_control.clear()
    module.zero_grad(set_to_none=True)  # an out-of-memory step may leave gradients behind
    module.trainer = None  # drop the trainer (and its optimizer state) before the next run
    del trainer, loader
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


VARIANTS: dict[str, dict[str, Any]] = {
    # what trainer=gpu gives: the stage config's model.performance (conf/model/video_stage<N>.yaml), cuDNN
    # autotuning (trainer/gpu.yaml) and, from the module, fused AdamW on CUDA
    "default": {"performance": "config", "cudnn_benchmark": True, "fused": "auto"},
    "plain": {},
    "channels_last": {"performance": {"channels_last": True}},
    "fused_adamw": {"fused": True},
    "compiled": {"performance": {"compile": {}}},
    "fast": {"performance": {"channels_last": True, "compile": {}}, "fused": True, "cudnn_benchmark": True},
    "fast_cudagraphs": {"performance": {"channels_last": True, "compile": {"mode": "reduce-overhead"}}, "fused": True,
                        "cudnn_benchmark": True},
    "cuda_graphs": {"performance": {"cuda_graphs": True}},
    "graphs_fused": {"performance": {"cuda_graphs": True}, "fused": True, "cudnn_benchmark": True},
    "graphs_fast": {"performance": {"cuda_graphs": True, "channels_last": True}, "fused": True, "cudnn_benchmark": True},
}
# model.loader.latent_cache: the same steps on precomputed posteriors and CLIP embeddings (no encoders in the step);
# default_cached is what trainer=gpu gives (latent_cache: auto) on data whose latents were built once
VARIANTS["default_cached"] = {**VARIANTS["default"], "cached_latents": True}
VARIANTS["graphs_fast_cached"] = {**VARIANTS["graphs_fast"], "cached_latents": True}


def parse_checkpointing_arg(text: str) -> bool | tuple[int, ...]:
    """``off`` / ``on`` / ``0+1`` (the levels whose layers run under checkpointing)."""
    named = {"off": False, "on": True}
    if text in named:
        return named[text]
    try:
        return tuple(int(level) for level in text.split("+"))
    except ValueError:
        raise SystemExit(f"--checkpointing: {text!r} is not off, on or levels such as 0+1") from None


def performance(stage: int, spec: dict[str, Any]) -> dict[str, Any]:
    """A variant's ``model.performance``: its own, or (``"config"``) the stage config's, as trainer=gpu gives it."""
    if spec.get("performance") != "config":
        return dict(spec.get("performance", {}))
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"video_stage{stage}.yaml")
    return dict(OmegaConf.to_container(config.performance, resolve=True))


def build(stage: int, backbone: dict, variant: str, stage1: VideoStage1Module | None, eight_bit) -> pl.LightningModule:
    spec = VARIANTS[variant]
    torch.backends.cudnn.benchmark = bool(spec.get("cudnn_benchmark"))  # autotuned convolution algorithms
    optimizer = {"_target_": "torch.optim.AdamW", "lr": 1e-5, "betas": [0.9, 0.999], "weight_decay": 1e-2, "eps": 1e-8}
    automatic = spec.get("fused") == "auto"  # trainer=gpu's choice: 8-bit AdamW where bitsandbytes runs, else fused
    if not automatic:  # the other variants name torch's AdamW implementation
        optimizer["fused"] = bool(spec.get("fused"))
    settings = {"eight_bit_adam": eight_bit if automatic else False, "scheduler": None, "optimizer": optimizer,
                # the variants without graphs time the eager step (the default, cuda_graphs=auto, would capture)
                "performance": {"cuda_graphs": False, **performance(stage, spec)}}
    if stage == 1:
        return VideoStage1Module(backbone, **settings)
    module = VideoStage2Module(backbone, **settings)
    module.load_stage1_from_module(stage1)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny backbone at 64x64 on the CPU (smoke test)")
    parser.add_argument("--small", action="store_true", help="backbone=small at 256x256 (its seeded random VAE)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda unless --tiny")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on GPU, 32-true on CPU)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--stage1-batch", type=int, default=4)
    parser.add_argument("--stage2-batch", type=int, default=1)
    parser.add_argument("--stage2-frames", type=int, default=16)
    parser.add_argument("--stages", default="1,2", help="which stages to time, e.g. 1 or 1,2")
    parser.add_argument("--checkpointing", default="off,on",
                        help="gradient checkpointing settings to time: off, on, or resolution levels joined by + "
                             "(0+1: only the two top levels; models/checkpointing.py)")
    parser.add_argument("--variants", default="plain", help=f"comma list of {sorted(VARIANTS)} (model.performance etc.)")
    parser.add_argument("--flops", action="store_true", help="count one step's FLOPs (MFU against the measured ceiling)")
    parser.add_argument("--profile", action="store_true", help="count one step's CUDA kernels (torch.profiler)")
    parser.add_argument("--eight-bit-adam", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--backbone-dir", type=Path, default=Path("/tmp/aniportrait-random-sd15"),
                        help="where the random SD-1.5-shaped backbone is written (reused when present)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.tiny:
        args.stage2_frames = min(args.stage2_frames, 4)
        args.warmup, args.repeats = min(args.warmup, 3), min(args.repeats, 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    if args.tiny:
        backbone = {"kind": "tiny", "seed": 0}
        size, clip_size = 64, 32
    elif args.small:
        backbone = {"kind": "small", "seed": 0}
        size, clip_size = 256, 64
    else:
        backbone = random_sd15_backbone(args.backbone_dir)
        size, clip_size = 512, 224
    args.ceiling = matmul_ceiling(args.device)
    eight_bit = {"auto": "auto", "true": True, "false": False}[args.eight_bit_adam]
    stages = [int(x) for x in args.stages.split(",")]
    checkpointing = [parse_checkpointing_arg(x) for x in args.checkpointing.split(",")]
    output = {
        "benchmark": "stage-B training step, tiny backbone (smoke test)" if args.tiny
        else "stage-B training step, backbone=small (random init)" if args.small
        else "stage-B training step, full SD-1.5 architecture (random init)",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "matmul_ceiling_bf16_tflops": args.ceiling,
        "results": [],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stage1_plain = None
    for variant in args.variants.split(","):
        for stage in stages:
            if stage == 2 and stage1_plain is None:
                stage1_plain = build(1, backbone, "plain", None, eight_bit)
            module = build(stage, backbone, variant, stage1_plain, eight_bit)
            if stage == 1 and variant == "plain":
                stage1_plain = module
            for checkpoint in checkpointing:
                frames, batch = (1, args.stage1_batch) if stage == 1 else (args.stage2_frames, args.stage2_batch)
                output["results"].append(run(module, frames, batch, size, clip_size, checkpoint, args, variant))
                output["total_seconds"] = round(time.perf_counter() - started, 1)
                args.out.write_text(json.dumps(output, indent=1) + "\n")  # every finished run is kept
            if module is not stage1_plain:
                del module
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
