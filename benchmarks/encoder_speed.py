"""The frozen encoders' share of a stage-B training step: SD-1.5's VAE encoder (the step's target and reference
images) and the CLIP ViT-L/14 image encoder, random init at SD-1.5 shapes, timed per call in the settings a step
can run them with (dtype, memory format, cuDNN autotuning, torch.compile). Also the kernels that dominate the VAE
call (torch.profiler), to tell convolutions from normalisation. Writes benchmarks/results/encoder_speed.json.

    python benchmarks/encoder_speed.py                 # GPU: stage 1's batch (8 images at 512 px, 4 CLIP images)
    python benchmarks/encoder_speed.py --tiny          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from video_bench_setup import CLIP_VIT_L14_CONFIG, SD_VAE_CONFIG, Timer

RESULTS = Path(__file__).parent / "results" / "encoder_speed.json"


def timed(function: Callable[[], Any], repeats: int, cuda: bool) -> dict[str, float]:
    """Median and min seconds of ``function`` over ``repeats`` calls after three warm-up calls."""
    for _ in range(3):
        function()
    seconds = []
    for _ in range(repeats):
        with Timer(cuda) as timer:
            function()
        seconds.append(timer.seconds)
    return {"seconds_median": round(statistics.median(seconds), 5), "seconds_min": round(min(seconds), 5)}


def top_kernels(function: Callable[[], Any], count: int = 12) -> list[dict[str, Any]]:
    """The kernels with the most device time over one call."""
    from torch.profiler import ProfilerActivity, profile

    function()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    rows = [event for event in prof.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda event: event.self_device_time_total, reverse=True)
    total = sum(event.self_device_time_total for event in rows) or 1.0
    return [{"kernel": event.key[:90], "calls": event.count, "ms": round(event.self_device_time_total / 1000, 3),
             "share": round(event.self_device_time_total / total, 3)} for event in rows[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (smoke test)")
    parser.add_argument("--images", type=int, default=8, help="VAE images per call (stage 1: 4 targets + 4 references)")
    parser.add_argument("--clip-images", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    vae_config, clip_config = dict(SD_VAE_CONFIG), dict(CLIP_VIT_L14_CONFIG)
    size, images, clip_images = args.size, args.images, args.clip_images
    if args.tiny:
        vae_config.update(block_out_channels=[32, 32, 64, 64], norm_num_groups=8)
        clip_config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, projection_dim=32)
        size, images, clip_images = 64, 2, 2
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config).to(device).eval().requires_grad_(False)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config)).to(device).eval().requires_grad_(False)
    pixels = torch.rand(images, 3, size, size, device=device) * 2 - 1
    clip_pixels = torch.randn(clip_images, 3, clip_config["image_size"], clip_config["image_size"], device=device)
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.float32]
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        vae.to(dtype=dtype, memory_format=torch.contiguous_format)
        clip.to(dtype=dtype)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            vae.to(memory_format=memory_format)
            x = pixels.to(dtype).contiguous(memory_format=memory_format)

            def encode(module=vae, x=x):
                with torch.no_grad():
                    return module.encode(x).latent_dist.mean

            row = {"part": "vae_encode", "dtype": str(dtype).split(".")[-1], "images": images, "size": size,
                   "channels_last": memory_format is torch.channels_last, "compiled": False, **timed(encode, args.repeats, cuda)}
            if cuda and dtype is torch.bfloat16:
                row["top_kernels"] = top_kernels(encode)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
            if args.compile and dtype is dtypes[0] and memory_format is torch.channels_last:
                encoder = torch.compile(vae.encoder)
                quant = vae.quant_conv

                def encode_compiled(x=x, encoder=encoder, quant=quant):
                    with torch.no_grad():
                        return quant(encoder(x))

                begin = time.perf_counter()
                encode_compiled()
                warm = time.perf_counter() - begin
                rows.append({"part": "vae_encode", "dtype": str(dtype).split(".")[-1], "images": images, "size": size,
                             "channels_last": memory_format is torch.channels_last, "compiled": True,
                             "compile_seconds": round(warm, 1), **timed(encode_compiled, args.repeats, cuda)})
                print(json.dumps(rows[-1]), flush=True)
                torch._dynamo.reset()
        y = clip_pixels.to(dtype)

        def embed(y=y):
            with torch.no_grad():
                return clip(y).image_embeds

        rows.append({"part": "clip_image_encoder", "dtype": str(dtype).split(".")[-1], "images": clip_images,
                     "compiled": False, **timed(embed, args.repeats, cuda)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "frozen encoders of a stage-B training step (random init, SD-1.5 shapes)",
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
