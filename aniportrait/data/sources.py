"""Dataset sources for the ``data`` config group: where a clip-format dataset lives (or how to make it).

Every source resolves to a dataset root holding ``manifest.jsonl`` (GUIDE section 3). Models bring their
own datamodules (frames for the video stage, audio windows for the landmark stage) built on that root.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from aniportrait.data.clip import Manifest
from aniportrait.errors import AniPortraitError

__all__ = ["ClipSource", "SyntheticSource"]

log = logging.getLogger(__name__)


class ClipSource:
    """A prepared dataset folder (``python -m aniportrait.data.prepare``, or any clip-format root)."""

    def __init__(self, root: str):
        self.root = root

    def resolve(self) -> Path:
        root = Path(os.path.expanduser(str(self.root)))
        if not root.is_dir():
            raise AniPortraitError(
                f"dataset folder not found: {root} (config key data.root); prepare one with "
                "`python -m aniportrait.data.prepare input=VIDEOS output=ROOT`"
            )
        Manifest.load(root)  # fails with a clear message when the manifest is missing or malformed
        return root


class SyntheticSource:
    """The embedded synthetic talking-head dataset, generated on first use and cached under ``root``.

    Keyword arguments other than ``root``, ``workers`` and ``progress`` are SyntheticSpec fields
    (seed, identities, clips_per_identity, clip_seconds, fps, size).
    """

    def __init__(self, root: str, workers: int = 1, progress: bool = True, **spec):
        from aniportrait.data.synthetic import SyntheticSpec

        self.root, self.workers, self.progress = root, workers, progress
        self.spec = SyntheticSpec(**spec)

    def resolve(self) -> Path:
        from aniportrait.data.synthetic import dataset_dir, ensure_synthetic_dataset

        root = Path(os.path.expanduser(str(self.root)))
        existed = (dataset_dir(root, self.spec) / "manifest.jsonl").is_file()
        started = time.perf_counter()
        path = ensure_synthetic_dataset(root, self.spec, workers=self.workers, progress=self.progress)
        if not existed:
            log.info("synthetic dataset generated in %.1f s: %s", time.perf_counter() - started, path)
        return path
