"""Learning check: overfit stage 1 on one real talking-head clip and track the LPIPS of held-back frames.

Backbone: the full SD-1.5 architecture with RANDOM weights (no downloads; ``--tiny`` for a CPU smoke test). A random
VAE cannot reconstruct anything, so its first ``--vae-minutes`` fit the VAE as an autoencoder on the clip's training
frames (L1 + LPIPS + a small KL term); it is then frozen, as the recipe wants. Stage 1 then trains for ``--minutes``
with the official recipe (v-prediction, zero terminal SNR, min-SNR 5, noise offset, reference dropout) except the
learning rate (``--lr``, 1e-4: the official 1e-5 is for fine-tuning pretrained weights) at ``--size`` px.

Every ``--holdout-every``-th frame of the clip is held back: never a training target or reference. Every
``--eval-every`` seconds, ``--eval-frames`` held-back frames are generated from their pose images and the clip's first
frame (DDIM, ``--steps`` steps, guidance ``--guidance``, sampling with the training noise schedule) and compared with
the real frames: LPIPS (lpips package, ``--lpips-net`` trunk with ImageNet weights from torchvision's cache) and PSNR;
the same for as many training frames. The VAE's own reconstruction LPIPS of the held-back frames is the floor.
Writes benchmarks/results/overfit_stage1.json and overfit_stage1.png (LPIPS over training time).

    python benchmarks/overfit_stage1.py --minutes 6 --vae-minutes 1.5 --device cuda
    python benchmarks/overfit_stage1.py --tiny --minutes 0.3 --vae-minutes 0.1 --lpips-random-trunk   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from video_bench_setup import SHARED_SAMPLES, random_sd15_backbone, sample_clip_root

from aniportrait.data.sources import ClipSource
from aniportrait.data.video import read_video
from aniportrait.data.video_frames import VideoFrameDataModule
from aniportrait.face.drawing import draw_landmarks
from aniportrait.training.video import OFFICIAL_TRAIN_NOISE_SCHEDULER, VideoStage1Module

RESULTS = Path(__file__).parent / "results"
TORCHVISION_WEIGHTS = {"alex": "alexnet-owt-7be5be79.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth",
                       "vgg": "vgg16-397923af.pth"}
log = logging.getLogger("overfit_stage1")


def lpips_model(net: str, random_trunk: bool, device: torch.device) -> torch.nn.Module:
    import lpips

    weights = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_WEIGHTS[net]
    try:
        model = lpips.LPIPS(net=net, pnet_rand=random_trunk, verbose=False)
    except Exception as error:  # noqa: BLE001 - torchvision raises URLError / RuntimeError when offline
        raise SystemExit(
            f"LPIPS needs torchvision's ImageNet {net} weights at {weights} ({error}). Copy that file there (e.g. carry "
            f"{TORCHVISION_WEIGHTS['squeeze']}, 4.7 MB, and use --lpips-net squeeze), or pass --lpips-random-trunk "
            "(LPIPS with a random trunk: falls the same way, not comparable to published values)"
        ) from error
    return model.to(device).eval().requires_grad_(False)


def square_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop of (n, h, w, 3) frames, resized to size x size."""
    height, width = frames.shape[1:3]
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    return np.stack([cv2.resize(frame[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA)
                     for frame in frames])


def square_poses(lmks: np.ndarray, frame_size: tuple[int, int], size: int) -> np.ndarray:
    """Pose images (n, size, size, 3) of normalised landmarks (n, 478, 3) seen through the centre square crop."""
    height, width = frame_size
    side = min(height, width)
    offset = np.array([(width - side) / 2, (height - side) / 2])
    points = (lmks[..., :2] * np.array([width, height]) - offset) / side
    return np.stack([draw_landmarks(frame, (size, size), normalized=True) for frame in points])


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(prediction: np.ndarray, truth: np.ndarray) -> float:
    mse = np.mean((prediction.astype(np.float64) - truth.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0**2 / max(mse, 1e-10)))


def fit_vae(vae: torch.nn.Module, frames: np.ndarray, perceptual: torch.nn.Module, minutes: float, device: torch.device,
            batch_size: int, autocast: Any) -> int:
    """Fit the random VAE as an autoencoder on ``frames`` (n, H, W, 3) for ``minutes``; returns the steps taken."""
    vae.train().requires_grad_(True).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    images = to_tensor(frames, device)
    steps, deadline = 0, time.perf_counter() + minutes * 60
    while time.perf_counter() < deadline:
        batch = images[torch.randint(len(images), (batch_size,), generator=generator).to(device)]
        with autocast():
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = ((reconstruction.float() - batch).abs().mean() + perceptual(reconstruction.float(), batch).mean()
                    + 1e-6 * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        steps += 1
    vae.eval().requires_grad_(False)
    return steps


class HeldBackLPIPS(pl.Callback):
    """Generates the evaluation frames every ``every_seconds`` of training and records LPIPS / PSNR."""

    def __init__(self, material: dict[str, np.ndarray], perceptual: torch.nn.Module, every_seconds: float,
                 steps: int, guidance: float):
        self.material, self.perceptual = material, perceptual
        self.every_seconds, self.steps, self.guidance = every_seconds, steps, guidance
        self.curve: list[dict[str, float]] = []
        self.started = self.last = 0.0
        self.evaluating_seconds = 0.0

    def evaluate(self, trainer: pl.Trainer, module: VideoStage1Module) -> None:
        begin = time.perf_counter()
        pipeline = module.sampling_pipeline()
        module.eval()
        record: dict[str, float] = {"step": trainer.global_step,
                                    "train_seconds": round(begin - self.started - self.evaluating_seconds, 1)}
        with trainer.precision_plugin.forward_context():
            for split in ("held_back", "train"):
                generated = pipeline(self.material["reference"], self.material[f"{split}_poses"],
                                     self.material["reference_pose"], num_inference_steps=self.steps,
                                     guidance_scale=self.guidance, generator=torch.Generator().manual_seed(0),
                                     progress=False)
                truth = self.material[f"{split}_frames"]
                with torch.no_grad():
                    score = self.perceptual(to_tensor(generated, module.device), to_tensor(truth, module.device))
                record[f"{split}_lpips"] = round(float(score.mean()), 4)
                record[f"{split}_psnr"] = round(psnr(generated, truth), 2)
                if split == "held_back":
                    self.last_frames = generated
        module.train()
        self.curve.append(record)
        log.info("evaluation %s", record)
        self.evaluating_seconds += time.perf_counter() - begin
        self.last = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.started = time.perf_counter()
        self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if time.perf_counter() - self.last >= self.every_seconds:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module)


def plot(curve: list[dict[str, float]], vae_floor: float, backbone: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [point["train_seconds"] / 60 for point in curve]
    figure, axis = plt.subplots(figsize=(7, 3.5), dpi=110)
    axis.plot(minutes, [point["held_back_lpips"] for point in curve], "o-", label="held-back frames")
    axis.plot(minutes, [point["train_lpips"] for point in curve], "s--", label="training frames", alpha=0.7)
    axis.axhline(vae_floor, color="gray", linestyle=":", label="VAE reconstruction (floor)")
    axis.set_xlabel("stage-1 training minutes")
    axis.set_ylabel("LPIPS (lower is better)")
    axis.set_title(f"Stage 1 overfitting one clip ({backbone})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0, help="stage-1 training minutes (evaluations included)")
    parser.add_argument("--vae-minutes", type=float, default=1.5, help="minutes fitting the random VAE first")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda unless --tiny")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone at 64 px (CPU smoke test)")
    parser.add_argument("--clip", default="sadtalker_WDA_KatieHill_000", help="a video of --samples with landmarks")
    parser.add_argument("--samples", type=Path, default=SHARED_SAMPLES, help="a copy of shared/samples")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--holdout-every", type=int, default=10)
    parser.add_argument("--eval-frames", type=int, default=8)
    parser.add_argument("--eval-every", type=float, default=60.0, help="seconds between evaluations")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per evaluation")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--lpips-net", choices=sorted(TORCHVISION_WEIGHTS), default="alex")
    parser.add_argument("--lpips-random-trunk", action="store_true")
    parser.add_argument("--backbone-dir", type=Path, default=Path("/tmp/aniportrait-random-sd15"))
    parser.add_argument("--out", type=Path, default=RESULTS / "overfit_stage1.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.tiny:
        args.size = 64
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    perceptual = lpips_model(args.lpips_net, args.lpips_random_trunk, device)
    with np.load(args.samples / "landmarks" / f"{args.clip}.npz") as data:
        lmks = data["lmks"]
    video = args.samples / "video" / f"{args.clip}.mp4"
    frames = read_video(video)
    frame_size = frames.shape[1:3]
    held_back = np.arange(args.holdout_every // 2, len(frames), args.holdout_every)
    training = np.setdiff1d(np.arange(len(frames)), held_back)
    evaluated = held_back[np.linspace(0, len(held_back) - 1, args.eval_frames).round().astype(int)]
    evaluated_training = training[np.linspace(0, len(training) - 1, args.eval_frames).round().astype(int)]
    reference = int(training[0])
    material = {
        "reference": square_frames(frames[[reference]], args.size)[0],
        "reference_pose": square_poses(lmks[[reference]], frame_size, args.size)[0],
        "held_back_frames": square_frames(frames[evaluated], args.size),
        "held_back_poses": square_poses(lmks[evaluated], frame_size, args.size),
        "train_frames": square_frames(frames[evaluated_training], args.size),
        "train_poses": square_poses(lmks[evaluated_training], frame_size, args.size),
    }

    started = time.perf_counter()
    if args.tiny:
        backbone = {"kind": "tiny", "seed": 0, "clip_image_processor": {"size": {"shortest_edge": 32},
                                                                        "crop_size": {"height": 32, "width": 32}}}
    else:
        backbone = random_sd15_backbone(args.backbone_dir, args.size, args.size)
    sampling = {"scheduler": {**OFFICIAL_TRAIN_NOISE_SCHEDULER}}  # sample with the schedule it is trained on
    module = VideoStage1Module(backbone, optimizer={"_target_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 1e-2},
                               gradient_checkpointing=args.gradient_checkpointing, sampling=sampling, scheduler=None)
    vae_steps = fit_vae(module.frozen.vae, square_frames(frames[training], args.size), perceptual, args.vae_minutes,
                        device, args.batch_size, autocast)
    with torch.no_grad(), autocast():
        truth = to_tensor(material["held_back_frames"], device)
        vae = module.frozen.vae
        reconstruction = vae.decode(vae.encode(truth).latent_dist.mean).sample.float().clamp(-1, 1)
        vae_floor = float(perceptual(reconstruction, truth).mean())
    log.info("VAE: %d steps, held-back reconstruction LPIPS %.4f", vae_steps, vae_floor)

    with tempfile.TemporaryDirectory() as folder:
        root = sample_clip_root(args.samples, folder, [args.clip], held_back={args.clip: held_back})
        data = VideoFrameDataModule(ClipSource(str(root)), width=args.size, height=args.size,
                                    clip_image_processor=backbone["clip_image_processor"], batch_size=args.batch_size,
                                    num_workers=args.workers, samples_per_epoch=10**7)
        curve = HeldBackLPIPS(material, perceptual, args.eval_every, args.steps, args.guidance)
        trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                             max_time={"seconds": args.minutes * 60}, max_steps=-1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[curve])
        trainer.fit(module, datamodule=data)

    first, last = curve.curve[0], curve.curve[-1]
    result = {
        "benchmark": "stage-1 overfitting of one real clip: LPIPS of held-back frames over training time",
        "backbone": "tiny (smoke test)" if args.tiny else "SD-1.5 architecture, random init; VAE fitted first",
        "clip": args.clip, "frames": len(frames), "held_back": held_back.tolist(), "evaluated": evaluated.tolist(),
        "reference_frame": reference, "size": args.size, "batch_size": args.batch_size, "lr": args.lr,
        "precision": precision, "gradient_checkpointing": args.gradient_checkpointing,
        "sampling": {"steps": args.steps, "guidance": args.guidance, "scheduler": "DDIM, training noise schedule"},
        "lpips": {"net": args.lpips_net, "trunk": "random" if args.lpips_random_trunk else "ImageNet (torchvision)"},
        "vae": {"minutes": args.vae_minutes, "steps": vae_steps, "held_back_reconstruction_lpips": round(vae_floor, 4)},
        "stage1_steps": trainer.global_step,
        "curve": curve.curve,
        "held_back_lpips_start": first["held_back_lpips"], "held_back_lpips_end": last["held_back_lpips"],
        "falls_clearly": last["held_back_lpips"] < 0.8 * first["held_back_lpips"],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "total_seconds": round(time.perf_counter() - started, 1),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(curve.curve, vae_floor, result["backbone"], args.out.with_suffix(".png"))
    grid = np.concatenate([np.concatenate(list(material["held_back_frames"]), axis=1),
                           np.concatenate(list(curve.last_frames), axis=1)], axis=0)
    cv2.imwrite(str(args.out.with_name(args.out.stem + "_frames.png")), grid[..., ::-1])
    print(json.dumps({key: result[key] for key in ("held_back_lpips_start", "held_back_lpips_end", "falls_clearly",
                                                   "stage1_steps", "total_seconds")}))


if __name__ == "__main__":
    main()
