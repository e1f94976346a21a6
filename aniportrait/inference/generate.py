"""Stage B, streamed: pose images -> an H.264 mp4 with the driver's audio, chunk by chunk, at bounded memory.

Frames are written as they are decoded, by :class:`~aniportrait.data.video.VideoWriter` in a child process
(:class:`~aniportrait.data.video_encoder.EncoderProcess`, so H.264 encoding never takes the interpreter lock from
the thread that launches GPU work). With the
official sampling preset the whole video is one sequence of context windows, as in the official pipeline
(``chunk_frames`` None). Otherwise stage B samples ``chunk_frames`` frames per pipeline call: neighbouring chunks
share ``chunk_overlap`` frames that both generate from the same pose images; those frames are cross-faded with
weights ramping linearly from the earlier chunk to the later one, so a chunk boundary is a short dissolve between
two renderings of the same poses, never a cut (and the frames there differ from one unchunked sequence). Within a
chunk the pipeline's context windows combine in latent space at every step. mode=landmarks writes the pose images
themselves and the arrays behind them.

Sampling and writing overlap: the frames are produced (sampled and decoded on the GPU) on a thread of their own
while the main thread hands them to the encoder process (H.264 and AAC on another core), at most
``WRITE_AHEAD_FRAMES`` apart; the frames and the file are the same as one thread doing both.

Every output is written under a temporary name and renamed when complete, so a failure leaves no partial file.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aniportrait.audio.io import SAMPLE_RATE
from aniportrait.data.video import VideoWriter
from aniportrait.data.video_encoder import EncoderProcess, encoder_threads
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import Portrait
from aniportrait.inference.interpolation import build_interpolator, fill_between_keyframes, keyframe_indices
from aniportrait.inference.motion import Motion
from aniportrait.inference.options import AnimationOptions, Sampling
from aniportrait.inference.pose_sources import (
    KeyframePoseImages,
    MeshPoseFrames,
    PoseFrames,
    draw_pose_images,
)
from aniportrait.pipelines.presets import sampling_preset
from aniportrait.utils.atomic import atomic_path
from aniportrait.utils.background import in_background

if TYPE_CHECKING:
    from aniportrait.pipelines.pose2video import Pose2VideoPipeline

__all__ = ["chunk_spans", "stitch_chunks", "build_sampling_scheduler", "generate_video", "write_landmark_outputs"]

# A video of at most this many (key)frames keeps its PoseGuider features for all steps (about 4 MB a frame at
# 512 x 512 in bf16); longer ones recompute them every step instead of holding them all.
POSE_FEATURE_CACHE_FRAMES = 256
# Frames sampled ahead of the encoder (about 0.8 MB each at 512 x 512): the GPU never waits for a full chunk to encode.
WRITE_AHEAD_FRAMES = 256


def chunk_spans(num_frames: int, chunk_frames: int, overlap: int, first_frames: int | None = None) -> list[slice]:
    """Consecutive spans of at most ``chunk_frames`` covering ``range(num_frames)``, neighbours sharing exactly
    ``overlap`` frames (every span is longer than the overlap). ``first_frames``: the first span's length instead
    (a short first chunk: a streaming viewer's first frame comes sooner)."""
    if chunk_frames < 1 or not 0 <= overlap < chunk_frames:
        raise AniPortraitError(f"chunk_frames={chunk_frames}, chunk_overlap={overlap}: need chunk_frames >= 1 and "
                               "0 <= chunk_overlap < chunk_frames")
    if first_frames is not None and not overlap < first_frames:
        raise AniPortraitError(f"first_chunk_frames={first_frames}: give more frames than chunk_overlap={overlap}")
    first = chunk_frames if first_frames is None else first_frames
    if num_frames <= first:
        return [slice(0, num_frames)]
    spans = [slice(0, first)]
    for start in range(first - overlap, num_frames - overlap, chunk_frames - overlap):
        spans.append(slice(start, min(start + chunk_frames, num_frames)))
    return spans


def stitch_chunks(chunks: Iterable[np.ndarray | Iterable[np.ndarray]], overlap: int) -> Iterator[np.ndarray]:
    """Chunks of frames whose neighbours share ``overlap`` frames -> each frame once, the shared ones cross-faded
    (the later chunk's weight rising linearly through the overlap).

    A chunk is an array (T, H, W, 3) or an iterable of such batches (the pipeline's frames as the VAE decodes them):
    a frame is yielded as soon as it is known not to be in the overlap with the next chunk, so a stream's first
    frames leave while the rest of their chunk still decodes."""
    tail: list[np.ndarray] | None = None  # the last `overlap` frames of the previous chunk, held back
    for chunk in chunks:
        weights = None if tail is None else np.arange(1, len(tail) + 1, dtype=np.float32) / (len(tail) + 1)
        held: deque[np.ndarray] = deque()  # this chunk's frames not yet yielded: the last `overlap` stay
        position = 0
        for batch in ([chunk] if isinstance(chunk, np.ndarray) else chunk):
            for frame in batch:
                if tail is not None and position < len(tail):
                    weight = weights[position]
                    frame = np.round((1 - weight) * tail[position] + weight * frame).astype(np.uint8)
                position += 1
                held.append(frame)
                if len(held) > overlap:
                    yield held.popleft()
        tail = list(held)
    if tail is not None:
        yield from tail


def build_sampling_scheduler(choice: Any, base: Any, key: str = "scheduler") -> Any:
    """``scheduler=``: another diffusers scheduler for sampling, built with ``from_config`` on the bundle's
    scheduler config (so v-prediction, zero-terminal-SNR betas and timestep spacing carry over) plus overrides.
    ``choice``: a class name of diffusers ("DPMSolverMultistepScheduler") or {_target_: diffusers.X, **overrides}.
    An override the class does not take is refused (diffusers would ignore it); errors name ``key``."""
    import diffusers

    if isinstance(choice, str):
        choice = {"_target_": choice}
    if not isinstance(choice, Mapping) or not choice.get("_target_"):
        raise AniPortraitError(f"{key}={choice!r}: give a diffusers scheduler class, e.g. "
                               "scheduler=DPMSolverMultistepScheduler or '{_target_: diffusers.UniPCMultistepScheduler}'")
    overrides = dict(choice)
    name = str(overrides.pop("_target_")).removeprefix("diffusers.").removeprefix("schedulers.")
    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise AniPortraitError(f"{key}: {name!r} is not a diffusers scheduler (e.g. DDIMScheduler, "
                               "DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler)")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise AniPortraitError(f"{key}: {unknown} are not settings of {name} (it takes {sorted(accepted)})")
    if name == "DPMSolverMultistepScheduler":  # zero terminal SNR: the last step must land on sigma 0
        overrides.setdefault("final_sigmas_type", "zero")
    return cls.from_config(base.config, **overrides)



def generate_video(pipeline: Pose2VideoPipeline, portrait: Portrait, pose_frames: PoseFrames, output: Path, fps: float,
                   audio: np.ndarray | None, options: AnimationOptions,
                   on_frame: Callable[[int], None] | None = None) -> int:
    """Sample the video (keyframes only in accelerated mode) and write every frame to ``output`` with ``audio``
    muxed (atomically); returns the frame count. ``on_frame(count)`` is called after each frame is encoded (a
    streaming consumer's hook: first-frame latency, live progress).

    The whole video is one sequence of context windows when ``chunk_frames`` resolves to None (the official preset's
    default): pose images are drawn window by window and frames written as the VAE decodes them, so memory grows
    only with the latents (64 KB a frame at 512 x 512). Otherwise it is sampled in chunks that cross-fade."""
    sampling = Sampling.resolve(options, pipeline.video_settings)
    if options.scheduler is not None or sampling.preset != pipeline.preset.name:
        scheduler = build_sampling_scheduler(options.scheduler, pipeline.scheduler) if options.scheduler is not None \
            else pipeline.scheduler
        swapped = pipeline.scheduler, pipeline.preset
        pipeline.scheduler, pipeline.preset = scheduler, sampling_preset(sampling.preset)
        try:
            return generate_video(pipeline, portrait, pose_frames, output, fps, audio,
                                  dataclasses.replace(options, scheduler=None, sampling=sampling.preset), on_frame)
        finally:
            pipeline.scheduler, pipeline.preset = swapped
    total = len(pose_frames)
    keys = keyframe_indices(total, int(options.keyframe_interval))
    interpolator = build_interpolator(options.interpolator) if options.keyframe_interval > 1 else None
    reference_pose = draw_pose_images(portrait.lmks[None, :468, :2], pose_frames.size)[0]  # the portrait's own landmarks
    generator = torch.Generator("cpu").manual_seed(sampling.seed)  # the same noise on CPU and GPU
    arguments = {"num_inference_steps": sampling.steps, "guidance_scale": sampling.guidance,
                 "context_frames": sampling.context_frames, "context_overlap": sampling.context_overlap,
                 "generator": generator, "progress": options.progress, "width": sampling.width,
                 "height": sampling.height, "window_batch": int(options.window_batch),
                 "deep_cache_interval": sampling.deep_cache_interval,
                 **({} if options.decode_batch is None else {"decode_batch_size": int(options.decode_batch)})}

    def whole_video() -> Iterator[np.ndarray]:
        for batch in pipeline.frames(portrait.image, KeyframePoseImages(pose_frames, keys), reference_pose,
                                     cache_pose_features=len(keys) <= POSE_FEATURE_CACHE_FRAMES, **arguments):
            yield from batch

    def chunks() -> Iterator[np.ndarray]:
        for span in chunk_spans(len(keys), sampling.chunk_frames, int(options.chunk_overlap),
                                options.first_chunk_frames):
            yield pipeline.frames(portrait.image, pose_frames.render(keys[span]), reference_pose, **arguments)

    keyframes = whole_video() if sampling.chunk_frames is None else stitch_chunks(chunks(), int(options.chunk_overlap))
    frames = fill_between_keyframes(keys, keyframes, interpolator) if interpolator else keyframes
    writer = EncoderProcess(output, fps, threads=encoder_threads(options.encoder_threads))
    with writer, tqdm(total=total, desc="frames", unit="frame", disable=not options.progress) as bar:
        writer.set_audio(_audio_for(audio, total, fps))
        for frame in in_background(frames, WRITE_AHEAD_FRAMES, name="stage-b-frames"):
            writer.write(frame)
            bar.update(1)
            if on_frame is not None:
                on_frame(writer.frames_written)
    return writer.frames_written


def write_landmark_outputs(output: Path, pose_frames: MeshPoseFrames, motion: Motion, portrait: Portrait,
                           progress: bool = True, chunk_frames: int = 256) -> int:
    """mode=landmarks: the pose-image video (audio muxed) and ``<output>.npz`` (meshes, poses, 2-D landmarks in
    pixels, trans_mat, image_size, fps), both written atomically; pose images are drawn chunk by chunk."""
    total = len(pose_frames)
    height, width = pose_frames.size
    pixels = np.empty((total, 468, 2), dtype=np.float32)
    with atomic_path(output.with_suffix(".npz")) as arrays_tmp, VideoWriter(output, motion.fps) as writer:
        writer.set_audio(_audio_for(motion.audio, total, motion.fps))
        for span in tqdm(chunk_spans(total, chunk_frames, 0), desc="pose images", disable=not progress):
            indices = np.arange(span.start, span.stop)
            normalized = pose_frames.normalized(indices)  # (n, 468, 2)
            pixels[span] = normalized * np.array([width, height])
            writer.write(draw_pose_images(normalized, pose_frames.size))
        with open(arrays_tmp, "wb") as handle:
            np.savez_compressed(handle, meshes=np.asarray(motion.meshes, np.float32), poses=motion.poses.astype(np.float32),
                                landmarks=pixels, trans_mat=portrait.trans_mat.astype(np.float32),
                                image_size=np.array([height, width]), fps=np.float32(motion.fps))
    return total


def _audio_for(audio: np.ndarray | None, frames: int, fps: float) -> np.ndarray | None:
    """The audio to mux: exactly as long as the frames."""
    return None if audio is None else audio[: round(frames / fps * SAMPLE_RATE)]

