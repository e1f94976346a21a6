"""The Python API: one object that animates portraits, with two documented swap points.

```python
from aniportrait import AniPortrait

ap = AniPortrait()                                   # $ANIPORTRAIT_BUNDLE, else the official release (downloaded once)
ap = AniPortrait.from_pretrained("path/to/bundle", device="cuda")
ap.animate(image_path="me.png", audio_path="speech.wav", output_path="me.mp4")
ap.animate_from_video(image_path="me.png", video_path="driver.mp4", output_path="me_driven.mp4")
ap.animate_from_landmarks(image_path="me.png", landmarks_path="poses.npz", output_path="me_posed.mp4")
ap.landmarks(image_path="me.png", audio_path="speech.wav", output_path="poses.mp4")   # stage A only
ap.audio_processor = MyAudioProcessor()              # anything with the AudioProcessor interface
ap.motion_model = MyMotionModel()                    # anything with the MotionModel interface
results = ap.animate_batch([{"image_path": ..., "audio_path": ..., "output_path": ...}, ...])
```

Every method takes the options of :class:`aniportrait.inference.AnimationOptions` as keyword arguments (``width``,
``height``, ``fps``, ``length``, ``steps``, ``guidance``, ``seed``, ``keyframe_interval``, ...) and returns an
:class:`~aniportrait.inference.AnimationResult`. ``python infer.py mode=...`` runs these same methods.

Models load lazily on first use and stay loaded, so a batch pays for loading once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aniportrait.audio.io import load_audio
from aniportrait.bundle import BUNDLE_FILE, OFFICIAL_FILES, OFFICIAL_HUB_REPO, Bundle, import_official
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import Portrait
from aniportrait.inference import (
    AnimationOptions,
    AnimationResult,
    AudioProcessor,
    BatchJobResult,
    BundleMotionModel,
    MeshPoseFrames,
    MotionModel,
    ProcessedAudio,
    WaveformAudioProcessor,
    batch_summary,
    check_batch_outputs,
    check_collisions,
    check_output_path,
    generate_video,
    load_reference,
    motion_from_audio,
    motion_from_video,
    normalise_job,
    pose_frames_from_file,
    resolve_device,
    resolve_dtype,
    video_size,
    write_landmark_outputs,
)
from aniportrait.pipelines.landmarks import LandmarkPrediction, resolve_identity
from aniportrait.utils.signals import Interrupted

if TYPE_CHECKING:
    from aniportrait.pipelines.pose2video import Pose2VideoPipeline

__all__ = ["AniPortrait", "AudioProcessor", "MotionModel", "ProcessedAudio", "WaveformAudioProcessor",
           "BundleMotionModel", "LandmarkPrediction", "default_bundle"]

log = logging.getLogger(__name__)

_VIDEO_COMPONENTS = ("reference_unet", "denoising_unet", "pose_guider")


# -- default weights -----------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("ANIPORTRAIT_CACHE", Path.home() / ".cache" / "aniportrait")).expanduser()


def default_bundle() -> Path:
    """The bundle ``AniPortrait()`` uses: $ANIPORTRAIT_BUNDLE, else the official release imported into the cache
    (``$ANIPORTRAIT_CACHE/official``, linking the files huggingface_hub downloads and caches on first use)."""
    env = os.environ.get("ANIPORTRAIT_BUNDLE")
    if env:
        return Path(env).expanduser()
    cached = _cache_dir() / "official"
    if (cached / BUNDLE_FILE).is_file():
        return cached
    from huggingface_hub import snapshot_download

    log.info("downloading the official AniPortrait weights from huggingface.co/%s (about 10 GB, once)", OFFICIAL_HUB_REPO)
    try:
        folder = snapshot_download(OFFICIAL_HUB_REPO, allow_patterns=list(OFFICIAL_FILES.values()))
    except Exception as error:  # noqa: BLE001 - offline mode, HTTP and network stacks raise many types
        raise AniPortraitError(
            "no weights to animate with: set ANIPORTRAIT_BUNDLE (or bundle=) to a bundle folder (`python train.py` "
            "prints one; `python -m aniportrait.bundle import-official DIR OUT` makes one from the release files), "
            f"or allow the download of the official release from huggingface.co/{OFFICIAL_HUB_REPO} and the SD-1.5 "
            f"base models; the download failed: {type(error).__name__}: {' '.join(str(error).split())}"
        ) from error
    return import_official(folder, cached, link=True).path


# -- the object ----------------------------------------------------------------------------------------------------


class AniPortrait:
    """Portrait animation from a bundle (see the module docstring).

    bundle: a bundle folder or :class:`~aniportrait.bundle.Bundle`, opened at once; None: :func:`default_bundle`,
    resolved on first use (driving-video landmarks need no weights, so they never download any). device: "auto"
    (CUDA if present), "cpu", "cuda:1", ... dtype: stage B's precision, "auto" (GPU: fp16 with the bundle's official
    preset, else bf16; fp32 on CPU), "fp32", "bf16" or "fp16"; stage A runs in fp32 as official. backbone: replaces
    the bundle's ``base_models.video`` (the VAE and image encoder, e.g. local copies). landmarker_model: MediaPipe's
    face_landmarker .task for image portraits and driving videos. fast: sample with the bundle's distilled student
    (``model=video_distill``: a few LCM steps without guidance; its steps and guidance are the defaults of every call).
    """

    def __init__(self, bundle: str | os.PathLike | Bundle | None = None, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype | None = None, backbone: Mapping[str, Any] | None = None,
                 landmarker_model: str | os.PathLike | None = None, compile: bool | Mapping[str, Any] = False,
                 fast: bool = False):
        self._bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle) if bundle else None
        self.device = resolve_device(None if device is None else str(device))
        self.dtype = resolve_dtype(dtype, self.device)
        self.backbone = backbone
        self.landmarker_model = None if landmarker_model is None else str(landmarker_model)
        self._audio_processor: AudioProcessor = WaveformAudioProcessor()
        self._motion_model: MotionModel | None = None
        self._pipeline = None
        self.compile = compile  # torch.compile of stage B's UNet and VAE decoder (GPU; minutes once, then faster)
        self.fast = bool(fast)  # the bundle's distilled few-step student (model=video_distill) instead of the teacher

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = "auto", **kwargs: Any) -> AniPortrait:
        """A bundle trained here or imported from the official release (``python -m aniportrait.bundle import-official``)."""
        return cls(bundle=path, device=device, **kwargs)

    def __repr__(self) -> str:
        bundle = "default (not opened yet)" if self._bundle is None else repr(str(self._bundle.path))
        return f"AniPortrait(bundle={bundle}, device={self.device})"

    @property
    def bundle(self) -> Bundle:
        if self._bundle is None:
            self._bundle = Bundle.open(default_bundle())
        return self._bundle

    # -- swap points and lazily loaded models ------------------------------------------------------------------

    @property
    def audio_processor(self) -> AudioProcessor:
        return self._audio_processor

    @audio_processor.setter
    def audio_processor(self, processor: AudioProcessor) -> None:
        if not isinstance(processor, AudioProcessor):
            raise AniPortraitError(f"{type(processor).__name__} is no audio processor: it needs a method "
                                   "process(source, sample_rate) returning ProcessedAudio (aniportrait.api.AudioProcessor)")
        self._audio_processor = processor

    @property
    def motion_model(self) -> MotionModel:
        if self._motion_model is None:
            self._motion_model = BundleMotionModel.from_bundle(self.bundle, self.device)
        return self._motion_model

    @motion_model.setter
    def motion_model(self, model: MotionModel) -> None:
        if not isinstance(model, MotionModel):
            raise AniPortraitError(f"{type(model).__name__} is no motion model: it needs an fps attribute and a method "
                                   "predict(audio, portrait, *, fps, identity, pose_overrides) returning a "
                                   "LandmarkPrediction (aniportrait.api.MotionModel)")
        self._motion_model = model

    @property
    def pipeline(self) -> Pose2VideoPipeline:
        """Stage B (:class:`~aniportrait.pipelines.pose2video.Pose2VideoPipeline`), loaded on first use."""
        if self._pipeline is None:
            from aniportrait.pipelines.pose2video import Pose2VideoPipeline

            pipeline = Pose2VideoPipeline.from_bundle(self.bundle, self.device, self.dtype, backbone=self.backbone,
                                                      distilled=self.fast)
            self._pipeline = pipeline.optimize(compile=self.compile) if self.compile else pipeline
        return self._pipeline

    # -- generation --------------------------------------------------------------------------------------------

    def animate(self, image_path: str | os.PathLike, audio_path: str | os.PathLike | np.ndarray,
                output_path: str | os.PathLike, **options: Any) -> AnimationResult:
        """Portrait + speech -> talking video with the speech muxed (mode=audio)."""
        def drive(portrait: Portrait, opts: AnimationOptions, size: tuple[int, int]):
            motion = motion_from_audio(self.audio_processor, self.motion_model, portrait, audio_path, opts)
            return MeshPoseFrames(motion, portrait, size), motion.fps, motion.audio

        return self._animate(image_path, output_path, options, drive, {"audio": audio_path})

    def animate_from_video(self, image_path: str | os.PathLike, video_path: str | os.PathLike,
                           output_path: str | os.PathLike, **options: Any) -> AnimationResult:
        """Portrait + driving video -> the portrait reenacting it, the driver's audio muxed (mode=video)."""
        def drive(portrait: Portrait, opts: AnimationOptions, size: tuple[int, int]):
            motion = motion_from_video(portrait, video_path, opts, self.landmarker_model)
            return MeshPoseFrames(motion, portrait, size), motion.fps, motion.audio

        return self._animate(image_path, output_path, options, drive, {"video": video_path})

    def animate_from_landmarks(self, image_path: str | os.PathLike, landmarks_path: str | os.PathLike,
                               output_path: str | os.PathLike, audio_path: str | os.PathLike | None = None,
                               **options: Any) -> AnimationResult:
        """Portrait + poses -> video (mode=pose). landmarks_path: a pose-image video (its audio muxed), the .npz of
        :meth:`landmarks` or a clip's landmarks.npz. audio_path: audio to mux instead."""
        def drive(portrait: Portrait, opts: AnimationOptions, size: tuple[int, int]):
            frames, fps, audio = pose_frames_from_file(landmarks_path, size, opts,
                                                       self.bundle.settings.get("video", {}).get("fps") or 30.0)
            return frames, fps, (load_audio(audio_path) if audio_path else audio)

        return self._animate(image_path, output_path, options, drive, {"landmarks": landmarks_path, "audio": audio_path})

    def landmarks(self, image_path: str | os.PathLike, output_path: str | os.PathLike,
                  audio_path: str | os.PathLike | np.ndarray | None = None, video_path: str | os.PathLike | None = None,
                  **options: Any) -> AnimationResult:
        """Stage A alone (mode=landmarks): speech or a driving video + portrait -> the pose-image video (``size``
        square, audio muxed) and ``<output>.npz`` with meshes, poses and 2-D landmarks."""
        started = time.perf_counter()
        opts = AnimationOptions.from_kwargs(**options)
        output = check_output_path(output_path)
        if (audio_path is None) == (video_path is None):
            raise AniPortraitError("landmarks need exactly one driver: audio_path (speech) or video_path (a driving video)")
        check_collisions({"output": output, "output (its .npz)": output.with_suffix(".npz")},
                         {"reference": image_path, "audio": audio_path, "video": video_path,
                          "pose_template": opts.pose_template}, opts)
        if audio_path is not None:
            self._check_identity(opts)
        portrait = load_reference(image_path, opts.reference_frame, opts.size, self.landmarker_model)
        if audio_path is not None:
            motion = motion_from_audio(self.audio_processor, self.motion_model, portrait, audio_path, opts)
        else:
            motion = motion_from_video(portrait, video_path, opts, self.landmarker_model)
        frames = write_landmark_outputs(output, MeshPoseFrames(motion, portrait, portrait.image.shape[:2]), motion,
                                        portrait, opts.progress)
        return self._finish(output, frames, motion.fps, started, opts)

    def animate_batch(self, jobs: Iterable[Mapping[str, Any]], skip_existing: bool = True,
                      **defaults: Any) -> list[BatchJobResult]:
        """Run many jobs; one failure does not stop the rest. A job is a mapping of a method's arguments
        (``image_path``, one of ``audio_path`` / ``video_path`` / ``landmarks_path``, ``output_path``, options;
        ``mode`` is inferred or given as audio, video, pose or landmarks); ``defaults`` are options for every job.
        skip_existing: a job whose output exists is skipped (outputs appear only when complete, so a rerun resumes).
        """
        methods: dict[str, Callable[..., AnimationResult]] = {
            "audio": self.animate, "video": self.animate_from_video, "pose": self.animate_from_landmarks,
            "landmarks": self.landmarks}
        progress = bool(defaults.get("progress", True))
        jobs = list(jobs)
        readable = {}  # job number -> normalised job; the others fail below, each with its reason
        for index, job in enumerate(jobs, 1):
            try:
                readable[index] = normalise_job(job)
            except AniPortraitError:
                pass
        check_batch_outputs(list(readable.values()), [f"job {index}" for index in readable])  # before anything runs
        results = []
        try:
            self._run_jobs(jobs, methods, skip_existing, defaults, progress, results)
        except Interrupted as error:
            done = sum(result.status == "done" for result in results)
            raise Interrupted(error.signal_name, kept=f"{done} outputs finished in this run, {len(results)} of "
                              f"{len(jobs)} jobs handled (job {len(results) + 1}'s partial file removed)",
                              resume="rerun the same command: finished outputs are skipped") from error
        if progress:
            print(batch_summary(results), flush=True)
        return results

    @staticmethod
    def _run_jobs(jobs: list[Mapping[str, Any]], methods: Mapping[str, Callable[..., AnimationResult]],
                  skip_existing: bool, defaults: Mapping[str, Any], progress: bool, results: list) -> None:
        for index, job in enumerate(tqdm(jobs, desc="jobs", unit="job", disable=not progress), 1):
            output = None
            try:
                arguments = normalise_job(job)
                mode, output = arguments.pop("mode"), Path(arguments["output_path"])
                finished = output.is_file() and (mode != "landmarks" or output.with_suffix(".npz").is_file())
                if skip_existing and finished:
                    results.append(BatchJobResult(index, output, "skipped"))
                    continue
                result = methods[mode](**{**defaults, **arguments})
                results.append(BatchJobResult(index, output, "done", result=result))
            except Exception as error:  # noqa: BLE001 - one failing job must not stop the batch
                if not isinstance(error, AniPortraitError):
                    log.exception("batch job %d (%s) failed", index, output)
                results.append(BatchJobResult(index, output, "failed", f"{type(error).__name__}: {error}"
                                              if not isinstance(error, AniPortraitError) else str(error)))

    # -- shared steps --------------------------------------------------------------------------------------------

    def _animate(self, image_path: str | os.PathLike, output_path: str | os.PathLike, options: Mapping[str, Any],
                 drive: Callable[[Portrait, AnimationOptions, tuple[int, int]], tuple[Any, float, np.ndarray | None]],
                 inputs: Mapping[str, Any]) -> AnimationResult:
        """Check the options, the output (against the inputs too) and the bundle, load the portrait at the output size,
        get its pose frames from the driver, then stream stage B to the output."""
        started = time.perf_counter()
        opts = AnimationOptions.from_kwargs(**options)
        output = check_output_path(output_path)
        check_collisions({"output": output}, {"reference": image_path, **inputs, "pose_template": opts.pose_template},
                         opts)
        if "audio" in inputs and "landmarks" not in inputs:
            self._check_identity(opts)
        self.bundle.require(*_VIDEO_COMPONENTS, purpose="video generation (stage B)")
        size = video_size(opts, self.bundle.settings.get("video", {}))  # (height, width)
        portrait = load_reference(image_path, opts.reference_frame, max(size), self.landmarker_model)
        pose_frames, fps, audio = drive(portrait, opts, size)
        if not len(pose_frames):
            raise AniPortraitError(f"the driver of {output} gives no frames (length={opts.length}); nothing to generate")
        frames = generate_video(self.pipeline, portrait, pose_frames, output, fps, audio, opts)
        return self._finish(output, frames, fps, started, opts)

    def _check_identity(self, opts: AnimationOptions) -> None:
        """identity= against the bundle's Audio2Pose (its identity count and names) before any model loads; a swapped
        in motion model interprets identities itself."""
        if opts.identity is None or not isinstance(self._motion_model, (BundleMotionModel, type(None))):
            return
        entry = self.bundle.components.get("audio2pose")
        if entry is not None:
            resolve_identity(opts.identity, self.bundle.settings.get("audio", {}).get("pose", {}),
                             int(entry.get("config", {}).get("num_identities", 100)))

    def _finish(self, output: Path, frames: int, fps: float, started: float, opts: AnimationOptions) -> AnimationResult:
        result = AnimationResult(output, frames, fps, time.perf_counter() - started, str(self.device))
        if opts.progress:
            print(result.summary, flush=True)
        return result
