"""AniPortrait Lab: audio- and video-driven portrait animation.

Stage A (audio -> landmarks) lives in ``aniportrait.models.audio2mesh`` / ``audio2pose`` and
``aniportrait.pipelines.landmarks``; geometry and drawing in ``aniportrait.face``; the clip format
in ``aniportrait.data.clip``; checkpoint bundles in ``aniportrait.bundle``.
"""

__version__ = "0.1.0"

from aniportrait.errors import AniPortraitError  # noqa: E402

__all__ = ["AniPortraitError", "__version__"]
