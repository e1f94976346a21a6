"""Dataset sources for the ``data`` config group: where a clip-format dataset lives (or how to make it).

Every source resolves to a dataset root holding ``manifest.jsonl`` (GUIDE section 3). Models bring their
own datamodules (frames for the video stage, audio windows for the landmark stage) built on that root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aniportrait.data.clip import MANIFEST_NAME, Manifest
from aniportrait.errors import AniPortraitError

__all__ = ["ClipSource", "MixedSource", "SyntheticSource"]

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


class MixedSource:
    """Several datasets trained on as one (``data=mixed``): e.g. the many synthetic identities beside a few real
    clips, so that the appearance has to come from the reference instead of being memorised per identity.

    ``sources`` maps a name to a source (anything with ``resolve() -> root``). The combined root under ``root`` holds
    only a ``manifest.jsonl``: every clip of every source, its id and identity prefixed with the source's name
    (``real__clip7``), its splits kept, its files referenced by relative paths into the source's root (nothing is
    copied). Each distinct set of source manifests gets its own combined root (``mixed-<hash>``), written atomically.
    """

    def __init__(self, root: str, sources: Mapping[str, Any]):
        if not sources:
            raise AniPortraitError("data.sources is empty: give name: source pairs, e.g. synthetic: "
                                   "{_target_: aniportrait.data.sources.SyntheticSource, ...}, real: {...}")
        for name, source in sources.items():
            if not str(name).replace("_", "").replace("-", "").isalnum():
                raise AniPortraitError(f"data.sources: {name!r} is not a plain name (letters, digits, - and _)")
            if not callable(getattr(source, "resolve", None)):
                raise AniPortraitError(f"data.sources.{name} is not a dataset source (it needs a _target_, e.g. "
                                       "aniportrait.data.sources.ClipSource)")
        self.root, self.sources = root, dict(sources)

    def resolve(self) -> Path:
        roots = {name: Path(source.resolve()).resolve() for name, source in self.sources.items()}
        manifests = {name: Manifest.load(root) for name, root in roots.items()}
        digest = hashlib.sha256("".join(f"{name}={roots[name]}\n" + "".join(record.to_json() for record in manifest.records)
                                        for name, manifest in sorted(manifests.items())).encode()).hexdigest()[:10]
        combined = Path(os.path.expanduser(str(self.root))).resolve() / f"mixed-{digest}"
        if (combined / MANIFEST_NAME).is_file():
            return combined
        combined.mkdir(parents=True, exist_ok=True)
        records = []
        for name, manifest in manifests.items():
            for record in manifest.records:
                paths = {key: None if getattr(record, key) is None else
                         os.path.relpath(roots[name] / getattr(record, key), combined)
                         for key in ("video", "landmarks", "audio")}
                records.append(dataclasses.replace(record, id=f"{name}__{record.id}",
                                                   identity=f"{name}__{record.identity}", **paths))
        Manifest(combined, records).save()
        log.info("mixed dataset %s: %s clips", combined, {name: len(m.records) for name, m in manifests.items()})
        return combined
