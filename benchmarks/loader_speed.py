"""Stage-B loader throughput: training samples/s at 512x512 for a number of DataLoader workers (target: >= 50
samples/s with 8 workers, stage-1 samples).

The data are the shared real talking-head clips (512 px, H.264 / MPEG-4, with their reference landmarks) as a
clip-format dataset, or any prepared dataset (``--data``). A sample is what training consumes: decoded target
frame(s) and reference, pose images drawn from the landmarks, CLIP preprocessing, tensors; batches come from the
training loader itself (``VideoFrameDataModule.train_dataloader``). The first batches (worker start-up) are not
timed. Writes benchmarks/results/loader_speed.json.

    python benchmarks/loader_speed.py --workers 0 4 8 [--frames 1] [--size 512] [--seconds 20]
    python benchmarks/loader_speed.py --data /datasets/hdtf --workers 8
    python benchmarks/loader_speed.py --latent-cache --workers 2   # also the precomputed-latent path
    python benchmarks/loader_speed.py --gop-size 16 --workers 2   # also clips as prepare writes them

``--latent-cache`` times, beside the pixel path, the loader of ``model.loader.latent_cache`` (posterior rows and
CLIP embeddings read from each clip's safetensors file, pose images drawn; no video decoded). The files are built
first with small random encoders of SD-1.5's latent and embedding shapes (4 x 64 x 64 a frame at 512 px, 768-wide
embeddings), so the reads are the size a real cache's are; the encoders' cost is not part of what is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from video_bench_setup import SHARED_SAMPLES, sample_clip_root

from aniportrait.data.sources import ClipSource
from aniportrait.data.video import probe_video, read_video, write_video
from aniportrait.data.video_frames import VideoFrameDataModule

RESULTS = Path(__file__).parent / "results" / "loader_speed.json"
TARGET = 50.0


def samples_per_second(root: Path, workers: int, args: argparse.Namespace, latent_cache: bool = False,
                       ) -> dict[str, float]:
    data = VideoFrameDataModule(ClipSource(str(root)), n_sample_frames=args.frames, sample_rate=args.sample_rate,
                                width=args.size, height=args.size, batch_size=args.batch_size, num_workers=workers,
                                samples_per_epoch=10**7, crop_scale=args.crop_scale, latent_cache=latent_cache)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    for _ in range(max(2, 2 * workers // max(1, args.batch_size))):  # worker start-up and first decodes
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        count += len(next(batches)["sample_index"])
    elapsed = time.perf_counter() - start
    return {"path": "latent_cache" if latent_cache else "pixels", "workers": workers, "samples": count,
            "seconds": round(elapsed, 2), "samples_per_s": round(count / elapsed, 1)}


def build_cache(root: Path, args: argparse.Namespace) -> float:
    """Every clip's latent-cache file, made by small random encoders with SD-1.5's output shapes; returns seconds."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from aniportrait.training.latent_cache import ensure_latent_cache

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).eval()
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=224, patch_size=14,
                                                          projection_dim=768)).eval()
    data = VideoFrameDataModule(ClipSource(str(root)), n_sample_frames=args.frames, sample_rate=args.sample_rate,
                                width=args.size, height=args.size, latent_cache=True)
    data.setup("fit")
    start = time.perf_counter()
    ensure_latent_cache(data.datasets.values(), vae, clip, batch_size=8)
    return round(time.perf_counter() - start, 1)


def reencode(root: Path, gop_size: int) -> Path:
    """Every clip's video.mp4 (a link to a sample) replaced by an H.264 copy with that keyframe spacing."""
    for video in sorted((root / "clips").glob("*/video.mp4")):
        frames, fps = read_video(video), probe_video(video).fps
        video.unlink()
        write_video(video, frames, fps, gop_size=gop_size)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8], help="DataLoader worker counts to measure")
    parser.add_argument("--frames", type=int, default=1, help="frames per sample: 1 = stage 1, 16 = stage 2")
    parser.add_argument("--sample-rate", type=int, nargs="+", default=[1], help="frame stride(s) for --frames > 1")
    parser.add_argument("--size", type=int, default=512, help="output width and height")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=[1.0, 1.0], help="random crop augmentation")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per worker count")
    parser.add_argument("--samples", type=Path, default=SHARED_SAMPLES, help="a copy of shared/samples")
    parser.add_argument("--data", type=Path, default=None, help="a prepared clip-format dataset instead of the samples")
    parser.add_argument("--latent-cache", action="store_true", help="also time the precomputed-latent loader")
    parser.add_argument("--gop-size", type=int, nargs="+", default=None, metavar="N",
                        help="also time the pixel path on the samples re-encoded with a keyframe every N frames "
                             "(what prepare's gop_size writes; the samples' own H.264 has one per 250)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/loader_speed.json, or "
                        "loader_speed_latent_cache.json with --latent-cache")
    args = parser.parse_args()
    if (args.latent_cache or args.gop_size) and args.data:
        parser.error("--latent-cache and --gop-size write next to the clips: use them with the shared "
                     "samples, not --data")
    args.out = args.out or (RESULTS.with_name("loader_speed_latent_cache.json") if args.latent_cache
                            else RESULTS.with_name("loader_speed_gop.json") if args.gop_size
                            else RESULTS)

    build_seconds = None
    with tempfile.TemporaryDirectory() as folder:
        root = args.data or sample_clip_root(args.samples, folder)
        runs = [samples_per_second(root, workers, args) for workers in args.workers]
        if args.latent_cache:
            build_seconds = build_cache(root, args)
            runs += [samples_per_second(root, workers, args, latent_cache=True) for workers in args.workers]
        for interval in args.gop_size or []:
            encoded = reencode(sample_clip_root(args.samples, Path(folder) / f"keyframes_{interval}"), interval)
            runs += [{**samples_per_second(encoded, workers, args), "gop_size": interval}
                     for workers in args.workers]
    result = {
        "benchmark": f"stage-B training samples/s at {args.size}x{args.size}, {args.frames} frame(s) per sample",
        "data": str(args.data) if args.data else "shared/samples videos (4 clips, 512 px) + reference landmarks",
        "batch_size": args.batch_size,
        "runs": runs,
        "target_samples_per_s_with_8_workers": TARGET,
        "meets_target": next((run["samples_per_s"] >= TARGET for run in runs if run["workers"] == 8), None),
        **({"cache_build_seconds": build_seconds, "cache_encoders": "small random, SD-1.5 output shapes"}
           if build_seconds is not None else {}),
        "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
