"""benchmarks/stage_b_learning.py's packs: what the GPU phase writes comes back whole through a device that returns
files of at most 16 MiB (split into parts, joined again when scored)."""

from __future__ import annotations

import importlib.util
import random

from conftest import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("stage_b_learning", REPO / "benchmarks" / "stage_b_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_large_pack_is_split_into_parts_and_joined_again(tmp_path, monkeypatch):
    benchmark = _benchmark()
    monkeypatch.setattr(benchmark, "PACK_PART_BYTES", 25_000)
    members = []
    for index in range(7):  # 10 kB each: parts of two (a third would pass 25 kB)
        path = tmp_path / "work" / f"video_{index}.mp4"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(random.Random(index).randbytes(10_000))  # incompressible, as encoded video
        members.append((path, f"generated/full/{path.name}"))
    (tmp_path / "out").mkdir()
    parts = benchmark._write_pack(tmp_path / "out" / "synthetic.tar.gz", members)
    assert [part.name for part in parts] == ["synthetic.tar.gz", "synthetic.2.tar.gz", "synthetic.3.tar.gz",
                                             "synthetic.4.tar.gz"]
    assert all(part.stat().st_size <= 25_000 + 4_000 for part in parts)  # tar headers and gzip framing on top
    assert not list((tmp_path / "out").glob("*.partial"))
    benchmark._extract_pack(parts[0], tmp_path / "scored")
    for path, name in members:
        assert (tmp_path / "scored" / name).read_bytes() == path.read_bytes()


def test_identity_swaps_count_the_frames_that_show_another_identity():
    """A generated clip that shows another test identity's person on some frames is caught on exactly those frames;
    a clip that follows its own ground truth (with noise) has none."""
    import numpy as np

    benchmark = _benchmark()
    rng = np.random.default_rng(0)
    people = {name: rng.integers(0, 256, (1, 64, 64, 3)).repeat(10, axis=0).astype(np.uint8)
              for name in ("a", "b", "c")}
    truth = {name: frames.copy() for name, frames in people.items()}
    noisy = {name: np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)
             for name, frames in people.items()}
    swapped = noisy["a"].copy()
    swapped[[3, 4, 7]] = people["c"][0]  # three frames of the person of clip c
    result = benchmark.identity_swaps({"a": swapped, "b": noisy["b"]}, truth, {"a": "A", "b": "B", "c": "C"})
    assert result["clips"] == {"a": {"frames": 9, "swapped": 3}, "b": {"frames": 9, "swapped": 0}}
    assert abs(result["rate"] - 3 / 18) < 1e-9
    # clips of the same identity are no "other person": with no other identity there is nothing to count
    same = benchmark.identity_swaps({"a": swapped}, truth, {"a": "A", "b": "A", "c": "A"})
    assert same == {"rate": None, "clips": {}}
