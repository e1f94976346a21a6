"""data=mixed: several clip-format datasets as one root, read in place, ids and identities kept apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import hydra
import pytest
from test_configs import _compose as compose_config

from aniportrait.data.clip import Manifest
from aniportrait.data.sources import ClipSource, MixedSource
from aniportrait.data.video import read_video
from aniportrait.data.video_frames import VideoFrameDataModule
from aniportrait.errors import AniPortraitError

TINY_CLIP = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


@pytest.fixture()
def two_roots(tiny_dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The session's synthetic dataset and a copy of it standing in for a second dataset elsewhere on disk."""
    other = tmp_path / "elsewhere" / "real"
    shutil.copytree(tiny_dataset, other)
    return tiny_dataset, other


def test_every_clip_of_every_source_is_read_in_place(two_roots, tmp_path):
    first, second = two_roots
    root = MixedSource(str(tmp_path / "mixed"), {"synthetic": ClipSource(str(first)),
                                                 "real": ClipSource(str(second))}).resolve()
    combined = Manifest.load(root)
    originals = Manifest.load(first).records
    assert len(combined.records) == 2 * len(originals)
    assert sorted({record.id.split("__")[0] for record in combined.records}) == ["real", "synthetic"]
    assert len({record.identity for record in combined.records}) == 2 * len({r.identity for r in originals})
    for record in combined.records:
        name, original_id = record.id.split("__", 1)
        source_root = first if name == "synthetic" else second
        original = next(r for r in originals if r.id == original_id)
        assert record.split == original.split and record.frames == original.frames
        assert record.path(root, "video").resolve() == (source_root / original.video).resolve()  # nothing copied
    assert sorted(path.name for path in root.iterdir()) == ["manifest.jsonl"]
    # the same sources give the same root; a changed manifest a new one
    again = MixedSource(str(tmp_path / "mixed"), {"synthetic": ClipSource(str(first)),
                                                  "real": ClipSource(str(second))}).resolve()
    assert again == root
    manifest = Manifest.load(second)
    manifest.records = manifest.records[:-1]
    manifest.save()
    assert MixedSource(str(tmp_path / "mixed"), {"synthetic": ClipSource(str(first)),
                                                 "real": ClipSource(str(second))}).resolve() != root


def test_the_stage_b_loader_reads_frames_of_both_sources(two_roots, tmp_path):
    first, second = two_roots
    source = MixedSource(str(tmp_path / "mixed"), {"a": ClipSource(str(first)), "b": ClipSource(str(second))})
    module = VideoFrameDataModule(source, width=64, height=64, clip_image_processor=TINY_CLIP, num_workers=0,
                                  batch_size=2, samples_per_epoch=16)
    module.prepare_data()
    module.setup("fit")
    dataset = module.datasets["train"]
    names = {dataset.records[int(dataset[index]["clip_index"])].id.split("__")[0] for index in range(40)}
    assert names == {"a", "b"}  # samples come from both sources
    sample = dataset[0]
    assert sample["pixel_values"].shape == (1, 3, 64, 64) and bool(sample["pixel_values"].isfinite().all())
    root = source.resolve()
    record = Manifest.load(root).split("train")[0]
    assert read_video(record.path(root, "video")).shape[0] == record.frames


def test_bad_sources_are_refused_with_the_key(tmp_path):
    with pytest.raises(AniPortraitError, match="data.sources is empty"):
        MixedSource(str(tmp_path), {})
    with pytest.raises(AniPortraitError, match=r"data.sources.real is not a dataset source"):
        MixedSource(str(tmp_path), {"real": "/data/real"})
    with pytest.raises(AniPortraitError, match="not a plain name"):
        MixedSource(str(tmp_path), {"a/b": ClipSource(str(tmp_path))})


def test_data_mixed_composes_and_instantiates_its_sources(tmp_path, tiny_dataset):
    cfg = compose_config("train", ["data=mixed", "+data.sources.real._target_=aniportrait.data.sources.ClipSource",
                                   f"+data.sources.real.root={tiny_dataset}"], tmp_path)
    source = hydra.utils.instantiate(cfg.data)
    assert isinstance(source, MixedSource) and sorted(source.sources) == ["real", "synthetic"]
    assert isinstance(source.sources["real"], ClipSource)
