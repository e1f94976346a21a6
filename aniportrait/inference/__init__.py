"""Generation: a portrait and a driver -> an H.264 mp4 with the driver's audio, streamed to disk chunk by chunk.

This package is the one implementation behind both ``python infer.py mode=...`` and :class:`aniportrait.api.AniPortrait`
(the entry point, :mod:`aniportrait.cli`, builds an ``AniPortrait`` and calls the method of its mode):

mode=audio      portrait + speech -> video: stage A (Audio2Mesh + Audio2Pose) -> pose images -> stage B; speech muxed
mode=video      portrait + driving video -> reenactment: the driver's expression and head motion retargeted onto
                the portrait (:mod:`aniportrait.face.retarget`) -> pose images -> stage B; the driver's audio muxed
mode=pose       portrait + a pose-image video, or a landmarks .npz (mode=landmarks output or a clip's) -> stage B
mode=landmarks  stage A alone: speech or a driving video + portrait -> the pose-image video (audio muxed) and the
                meshes, poses and 2-D landmarks as .npz beside it
mode=batch      a CSV / JSONL manifest of jobs of the modes above; finished outputs are skipped on rerun, a failing
                job is reported and the rest still run

Bounded memory for inputs of any length (10 minutes of speech): stage A is chunked
(:mod:`aniportrait.pipelines.landmarks`) and keeps only per-frame meshes and poses (~6 KB a frame); pose images are
drawn chunk by chunk; stage B is streamed (:mod:`~aniportrait.inference.generate`).

One module per step, data flowing down the list (each imports only those above it):

options        devices, dtypes, the output path, the portrait, :class:`AnimationOptions` and their resolution
motion         the swap points (audio processor, motion model) and the meshes and poses they give, or a driving video's
pose_sources   pose images drawn (or decoded) chunk by chunk
interpolation  accelerated mode: frames between generated keyframes
generate       stage B streamed to the output file; mode=landmarks outputs
batch          mode=batch manifests
"""

from aniportrait.face.portrait import Portrait
from aniportrait.inference.batch import (
    JOB_MODES,
    BatchJobResult,
    batch_summary,
    check_batch_outputs,
    job_outputs,
    normalise_job,
    read_manifest,
)
from aniportrait.inference.generate import (
    build_sampling_scheduler,
    chunk_spans,
    generate_video,
    stitch_chunks,
    write_landmark_outputs,
)
from aniportrait.inference.interpolation import (
    FlowInterpolator,
    FrameInterpolator,
    LinearInterpolator,
    build_interpolator,
    fill_between_keyframes,
    keyframe_indices,
)
from aniportrait.inference.motion import (
    AudioProcessor,
    BundleMotionModel,
    Motion,
    MotionModel,
    ProcessedAudio,
    WaveformAudioProcessor,
    motion_from_audio,
    motion_from_video,
)
from aniportrait.inference.options import (
    AnimationOptions,
    AnimationResult,
    Sampling,
    check_collisions,
    check_output_path,
    load_reference,
    resampled_indices,
    resolve_device,
    resolve_dtype,
    video_size,
)
from aniportrait.inference.pose_sources import (
    KeyframePoseImages,
    LandmarkPoseFrames,
    MeshPoseFrames,
    PoseFrames,
    VideoPoseFrames,
    draw_pose_images,
    pose_frames_from_file,
)

__all__ = [
    "AnimationOptions",
    "AnimationResult",
    "Sampling",
    "BatchJobResult",
    "JOB_MODES",
    "Motion",
    "ProcessedAudio",
    "AudioProcessor",
    "WaveformAudioProcessor",
    "MotionModel",
    "BundleMotionModel",
    "FrameInterpolator",
    "LinearInterpolator",
    "FlowInterpolator",
    "build_interpolator",
    "Portrait",
    "check_batch_outputs",
    "job_outputs",
    "check_collisions",
    "check_output_path",
    "load_reference",
    "resolve_device",
    "resolve_dtype",
    "resampled_indices",
    "motion_from_audio",
    "motion_from_video",
    "PoseFrames",
    "MeshPoseFrames",
    "LandmarkPoseFrames",
    "VideoPoseFrames",
    "KeyframePoseImages",
    "draw_pose_images",
    "pose_frames_from_file",
    "video_size",
    "generate_video",
    "build_sampling_scheduler",
    "write_landmark_outputs",
    "stitch_chunks",
    "fill_between_keyframes",
    "keyframe_indices",
    "chunk_spans",
    "read_manifest",
    "normalise_job",
    "batch_summary",
]
