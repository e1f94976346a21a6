"""Shared test fixtures: the shared reference folder, a tiny synthetic dataset and a tiny stage-A bundle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ANIPORTRAIT_SHARED", REPO.parent / "shared"))

# Tests run many tiny ops: intra-op threads only add synchronisation (and stall on a busy machine).
torch.set_num_threads(1)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when that folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (set ANIPORTRAIT_SHARED to the shared reference folder)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 identities x 3 clips x 1.5 s at 64x64 (train/val/test), generated once per session."""
    from aniportrait.data.sources import SyntheticSource

    root = tmp_path_factory.mktemp("synthetic")
    return SyntheticSource(root=str(root), identities=3, clips_per_identity=3, clip_seconds=1.5, size=64,
                           progress=False).resolve()


@pytest.fixture(scope="session")
def full_run(tiny_dataset, tmp_path_factory) -> subprocess.CompletedProcess:
    """`python train.py debug=fast data=synthetic_tiny` (the quickstart's stages, a few steps each), run once."""
    env = {"ANIPORTRAIT_DATA": str(tiny_dataset.parent), "ANIPORTRAIT_LOGS": str(tmp_path_factory.mktemp("logs"))}
    return run_cli("train.py", "debug=fast", "data=synthetic_tiny", env=env)


@pytest.fixture(scope="session")
def full_bundle(full_run) -> Path:
    """The bundle of ``full_run``: the VAE, stage A and stage-B stages 1 and 2 in one tiny bundle."""
    assert full_run.returncode == 0, full_run.stderr[-3000:]
    return Path(full_run.stdout.strip().splitlines()[-1].removeprefix("bundle: "))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_dataset) -> Path:
    """A stage-A bundle trained for a few steps on the tiny dataset (in-process, no Hydra)."""
    import pytorch_lightning as pl

    from aniportrait.data.audio_windows import AudioLandmarkDataModule
    from aniportrait.data.sources import ClipSource
    from aniportrait.training.audio import AudioLandmarkModule

    pl.seed_everything(0)
    module = AudioLandmarkModule(**tiny_module_kwargs())
    datamodule = AudioLandmarkDataModule(ClipSource(str(tiny_dataset)), window_frames=30, eval_window_frames=45,
                                         batch_size=4, samples_per_epoch=400)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=8)
    trainer.fit(module, datamodule=datamodule)
    return module.export(tmp_path_factory.mktemp("bundle") / "bundle")


def tiny_module_kwargs(**overrides) -> dict:
    """AudioLandmarkModule arguments of the tiny backbone (conf/backbone/tiny.yaml)."""
    from omegaconf import OmegaConf

    audio = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "backbone" / "tiny.yaml").audio)
    kwargs = {
        "backbone": audio,
        "audio2mesh": {"latent_dim": audio["latent_dim"]},
        "audio2pose": {"latent_dim": audio["pose_latent_dim"]},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
        "train_feature_encoder": True,
        "inference": {"pose_chunk_frames": 30, "pose_context_frames": 5},
    }
    kwargs.update(overrides)
    return kwargs


class CollectingWriter:
    """Stands in for the stage-B video writer (EncoderProcess; H.264 is lossy): keeps the frames it is given
    (``CollectingWriter.written``, reset by each new writer)."""

    written: list[np.ndarray] = []
    threads: int | None = None  # what the last writer was given

    def __init__(self, path, fps, threads=1):
        CollectingWriter.written, CollectingWriter.threads = [], threads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_audio(self, audio):
        pass

    def write(self, frame):
        CollectingWriter.written.append(frame)

    @property
    def frames_written(self) -> int:
        return len(CollectingWriter.written)


def keyframes(path) -> list[int]:
    """Indices of the video's keyframes, in display order."""
    import av

    with av.open(str(path)) as container:
        return [index for index, frame in enumerate(container.decode(video=0)) if frame.key_frame]


def run_cli(script: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run one of train.py / infer.py / evaluate.py as a user would; returns the CompletedProcess."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip where there is no CUDA device (CI). Under pytest-xdist (``-n 2 --dist loadgroup``, the
    README's command) the tests of the session's debug=fast run share one worker, so it is trained once."""
    for item in items:
        if {"full_run", "full_bundle"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("full_run"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
