"""The knobs of dataset preparation, set from the command line as ``key=value`` overrides.

The dataclass is the schema: OmegaConf checks every override's name and type, so a typo or a wrong
value fails with the key named. Values that change what a clip contains are recorded in the output
root; a later run with different ones is refused rather than mixing two kinds of clips in one dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from aniportrait.errors import AniPortraitError

__all__ = ["PrepareConfig", "parse_overrides", "PROCESSING_KEYS"]


@dataclass
class PrepareConfig:
    """Every option of ``python -m aniportrait.data.prepare``; see datasets/any_folder/README.md."""

    input: str = MISSING  # a folder of videos (searched recursively) or one video file
    output: str = MISSING  # dataset root: manifest.jsonl, clips/, qc/
    size: int = 512  # side of the square face crop, pixels
    fps: float = 30.0  # constant output frame rate (25 for HDTF)
    workers: int = 1  # processes, one source video each
    landmarker_model: str | None = None  # FaceLandmarker .task file (else ANIPORTRAIT_FACE_LANDMARKER, cache, download)

    # Clips
    min_clip_seconds: float = 2.0  # shorter face segments are dropped
    max_clip_seconds: float = 20.0  # longer ones are cut into equal parts
    max_source_seconds: float | None = None  # read only the start of each source (quick looks, tests)
    scene_cut_threshold: float = 0.3  # Bhattacharyya distance of consecutive frames' HSV histograms
    max_face_jump: float = 0.5  # face centre moving more than this x face size in one frame = a cut
    max_gap_seconds: float = 0.25  # face-loss gaps up to this stay inside a clip (valid=False frames)

    # Crop: one fixed square per clip, from the temporally smoothed face boxes (no jitter at all)
    crop_scale: float = 1.8  # crop side / face size (landmark box), plus the head's motion range
    min_crop_scale: float = 1.25  # the crop may shrink to this to stay inside the frame before padding
    crop_offset_y: float = -0.1  # crop centre above the face centre, in face sizes (room for hair)
    crop_smooth_seconds: float = 0.5  # moving mean over face boxes before the crop is fitted

    # Quality gates (the reasons land in the QC report)
    min_face_size: int = 128  # median face size in source pixels
    min_detection_rate: float = 0.9  # of frames with a face in the final crop
    min_face_fraction: float = 0.25  # median face size / crop side (a head moving across the frame fails)
    max_faces: int = 2  # faces the tracking pass looks for; with several, the largest is followed
    analysis_max_side: int = 1280  # face tracking runs on frames downscaled to this long side
    small_face_search: bool = True  # when nothing is found, search tiles of sampled frames for small faces

    # Output encoding
    crf: int = 18
    preset: str = "medium"
    # frames from one keyframe to the next (GOP; null: x264's 250). Training reads random frames, each decoded from
    # the keyframe before it: 16 made 2-frame reads 2.3-4.6x faster than 250, for 1.1-1.9x the bytes
    gop_size: int | None = 16
    mux_audio: bool = True  # also put the audio into video.mp4 (audio.wav is always written when present)

    # Identities and splits
    identity: str = "stem"  # stem | parent | hdtf | vfhq | celebvhq | regex:PATTERN (first group)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    split_file: str | None = None  # fixed assignments: JSON {identity: split} or lines "identity split"

    overwrite: bool = False  # delete everything prepared in output first
    progress: bool = True


# Options that change the content of a clip; a resumed run must use the same values. (gop_size is not one:
# at a fixed crf it changes where keyframes sit and the file size, not what the frames show, so clips made with
# different intervals can share a dataset.)
PROCESSING_KEYS = (
    "size", "fps", "min_clip_seconds", "max_clip_seconds", "max_source_seconds", "scene_cut_threshold",
    "max_face_jump", "max_gap_seconds", "crop_scale", "min_crop_scale", "crop_offset_y", "crop_smooth_seconds",
    "min_face_size", "min_detection_rate", "min_face_fraction", "max_faces", "analysis_max_side",
    "small_face_search", "crf", "preset", "mux_audio",
)


def _validate(config: PrepareConfig) -> PrepareConfig:
    checks = [
        (config.size >= 64 and config.size % 2 == 0, "size must be an even number of pixels >= 64"),
        (config.fps > 0, "fps must be positive"),
        (config.workers >= 1, "workers must be >= 1"),
        (0 < config.min_clip_seconds <= config.max_clip_seconds, "need 0 < min_clip_seconds <= max_clip_seconds"),
        (config.max_source_seconds is None or config.max_source_seconds > 0, "max_source_seconds must be positive"),
        (1.0 <= config.min_crop_scale <= config.crop_scale, "need 1 <= min_crop_scale <= crop_scale"),
        (0.0 <= config.min_detection_rate <= 1.0, "min_detection_rate is a fraction in [0, 1]"),
        (config.max_faces >= 1, "max_faces must be >= 1"),
        (config.gop_size is None or config.gop_size >= 1,
         "gop_size must be a positive number of frames, or null for the encoder's default"),
        (0.0 <= config.val_fraction and 0.0 <= config.test_fraction and config.val_fraction + config.test_fraction < 1.0,
         "val_fraction and test_fraction must be >= 0 and sum to less than 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise AniPortraitError(f"prepare: {message}")
    return config


def parse_overrides(overrides: list[str]) -> PrepareConfig:
    """``["input=DIR", "output=ROOT", "size=256"]`` -> a checked PrepareConfig."""
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise AniPortraitError(f"prepare takes key=value overrides; cannot read {bad[0]!r} (e.g. input=videos/ output=data/)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepareConfig), OmegaConf.from_dotlist(overrides))
        config = OmegaConf.to_object(merged)
    except MissingMandatoryValue as error:
        raise AniPortraitError(
            "prepare needs input=DIR (a folder of videos, or one video) and output=ROOT (the dataset folder)"
        ) from error
    except ConfigKeyError as error:
        known = ", ".join(f.name for f in fields(PrepareConfig))
        raise AniPortraitError(f"prepare: unknown option {error.full_key!r}; the options are {known}") from error
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise AniPortraitError(f"prepare: bad value for {getattr(error, 'full_key', '?')}: {message}") from error
    return _validate(config)


def processing_values(config: PrepareConfig) -> dict:
    """The options that decide a clip's content, as stored in the dataset root."""
    values = asdict(config)
    return {key: values[key] for key in PROCESSING_KEYS}
