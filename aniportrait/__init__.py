"""AniPortrait Lab: audio- and video-driven portrait animation.

``from aniportrait import AniPortrait`` is the one-call API (``aniportrait.api``). Stage A (audio -> landmarks) lives
in ``aniportrait.models.audio2mesh`` / ``audio2pose`` and ``aniportrait.pipelines.landmarks``; stage B
(landmarks -> video) in ``aniportrait.pipelines.pose2video``; geometry and drawing in ``aniportrait.face``; the clip
format in ``aniportrait.data.clip``; checkpoint bundles in ``aniportrait.bundle``.
"""

__version__ = "0.1.0"

from aniportrait.errors import AniPortraitError  # noqa: E402

__all__ = ["AniPortrait", "AniPortraitError", "__version__"]


def __getattr__(name: str):
    """``AniPortrait`` is imported on first access: ``import aniportrait`` stays cheap (no torch, no diffusers)."""
    if name == "AniPortrait":
        from aniportrait.api import AniPortrait

        return AniPortrait
    raise AttributeError(f"module 'aniportrait' has no attribute {name!r}")
