"""Two-process DDP (gloo, CPU) against one process with the same global batch (issue 7, CPU part)."""

import csv
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from aniportrait.bundle import Bundle
from aniportrait.data.audio_windows import AudioLandmarkDataModule
from aniportrait.data.sources import ClipSource

pytestmark = pytest.mark.filterwarnings("ignore")

# Dropout and SpecAugment draw their masks per process, so they are off here: the rest is deterministic.
# SGD, because Adam divides each gradient by its own magnitude: for near-zero gradients that turns
# float-rounding differences of the all-reduce into full-size update differences (a property of Adam).
COMMON = ["model=audio", "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.05", "~model.optimizer.betas",
          "+model.optimizer.momentum=0.9", "data=synthetic_tiny", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
          "model.scheduler.warmup_steps=2", "backbone.audio.config.mask_time_prob=0.0", "model.audio2pose.dropout=0.0", "callbacks.previews=null",
          "trainer.limit_val_batches=1", "model.loader.eval_batch_size=2"]


def _train(env, *overrides):
    result = run_cli("train.py", *COMMON, *overrides, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    bundle = Path(result.stdout.strip().splitlines()[-1].removeprefix("bundle: "))
    return bundle.parent, Bundle.open(bundle)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture()
def env(tiny_dataset, tmp_path):
    return {"ANIPORTRAIT_DATA": str(tiny_dataset.parent), "ANIPORTRAIT_LOGS": str(tmp_path / "logs")}


def _same_weights(a: Bundle, b: Bundle, atol=1e-5):
    for name in ("audio2mesh", "audio2pose"):
        sa, sb = a.state_dict(name), b.state_dict(name)
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=1e-4, msg=f"{name}.{key}")


def test_ddp_matches_one_process_and_checkpoints_cross_over(env, tmp_path):
    one_dir, one = _train(env, "model.loader.batch_size=4")
    two_dir, two = _train(env, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                          "trainer.sync_batchnorm=false", "model.loader.batch_size=2")
    one_losses, two_losses = _losses(one_dir), _losses(two_dir)
    assert len(one_losses) == 6 and one_losses.keys() == two_losses.keys()
    torch.testing.assert_close(torch.tensor(list(two_losses.values())), torch.tensor(list(one_losses.values())),
                               atol=1e-5, rtol=1e-4)
    _same_weights(one, two)
    # only rank 0 wrote: one bundle, one log folder, one checkpoint set
    assert len(list(Path(env["ANIPORTRAIT_LOGS"]).rglob("aniportrait.yaml"))) == 2
    # a checkpoint written by two processes resumes in one, and the other way round
    resumed_dir, resumed = _train(env, "model.loader.batch_size=4", f"ckpt_path={two_dir / 'checkpoints' / 'step_000003.ckpt'}")
    torch.testing.assert_close(torch.tensor([_losses(resumed_dir)[s] for s in (3, 4, 5)]),
                               torch.tensor([one_losses[s] for s in (3, 4, 5)]), atol=1e-5, rtol=1e-4)
    _same_weights(one, resumed)
    back_dir, back = _train(env, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                            "trainer.sync_batchnorm=false", "model.loader.batch_size=2",
                            f"ckpt_path={one_dir / 'checkpoints' / 'step_000003.ckpt'}")
    _same_weights(one, back)


class _FakeTrainer:
    def __init__(self, rank, world):
        self.global_rank, self.world_size, self.global_step, self.accumulate_grad_batches = rank, world, 0, 1


def test_shards_have_no_duplicates_and_drop_nothing(tiny_dataset):
    def indices(rank, world, batch):
        module = AudioLandmarkDataModule(ClipSource(str(tiny_dataset)), batch_size=batch, samples_per_epoch=96)
        module.setup("fit")
        module.trainer = _FakeTrainer(rank, world)
        return [list(b) for b in module.train_dataloader().batch_sampler]

    single = [i for batch in indices(0, 1, 8) for i in batch]
    shards = [indices(rank, 2, 4) for rank in range(2)]
    flat = [i for shard in shards for batch in shard for i in batch]
    assert sorted(flat) == sorted(single) == list(range(96))
    for step in range(len(shards[0])):  # each global batch is the single process's batch
        assert sorted(shards[0][step] + shards[1][step]) == sorted(indices(0, 1, 8)[step])


# Stage 1 on the tiny backbone. The PoseGuider's BatchNorm normalises with per-process batch statistics (SyncBatchNorm
# needs GPUs), so the one-process run takes two samples per micro-batch and accumulates two, as each of two DDP
# processes takes two: the same statistics, and the same averaged gradient. Reference dropout is off because
# it drops whole batches (the official rule), which are per process under DDP.
STAGE1 = ["model=video_stage1", "backbone=tiny", "data=synthetic_tiny", "model.optimizer._target_=torch.optim.SGD",
          "model.optimizer.lr=0.02", "~model.optimizer.betas", "~model.optimizer.eps", "+model.optimizer.momentum=0.9",
          "model.eight_bit_adam=false", "model.loss.uncond_ratio=0", "trainer.max_steps=3", "trainer.limit_val_batches=0",
          "trainer.log_every_n_steps=1", "model.loader.num_workers=0", "model.loader.batch_size=2", "held_out_videos=null"]


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_stage1_ddp_matches_one_process_with_the_same_global_batch(env):
    one_dir, one = _train_stage1(env, "trainer.accumulate_grad_batches=2")
    two_dir, two = _train_stage1(env, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                 "trainer.precision=32-true", "trainer.sync_batchnorm=false")
    changed = 0
    for name in ("reference_unet", "denoising_unet", "pose_guider"):
        sa, sb = one.state_dict(name), two.state_dict(name)
        assert sa.keys() == sb.keys()
        for key in sa:
            if "running_" in key or "num_batches_tracked" in key:  # BatchNorm buffers: rank 0's own samples under DDP
                continue
            torch.testing.assert_close(sa[key], sb[key], atol=2e-5, rtol=1e-4, msg=f"{name}.{key}")
    # the comparison can fail: training moved the weights away from their (seeded) initial values
    fresh_dir, fresh = _train_stage1(env, "trainer.max_steps=1", "model.optimizer.lr=0.0", "trainer.accumulate_grad_batches=1")
    for name in ("denoising_unet", "pose_guider"):
        sa, sf = one.state_dict(name), fresh.state_dict(name)
        changed += sum(not torch.equal(sa[key], sf[key]) for key in sa if "running_" not in key and "num_batches" not in key)
    assert changed > 10
    # the logged loss is each process's own (rank 0: samples 0-1), as one process's first batch of two
    assert _losses(two_dir)[0] == pytest.approx(_losses(fresh_dir)[0], rel=1e-4)


def _train_stage1(env, *overrides):
    result = run_cli("train.py", *STAGE1, *overrides, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    bundle = Path(result.stdout.strip().splitlines()[-1].removeprefix("bundle: "))
    return bundle.parent, Bundle.open(bundle)
