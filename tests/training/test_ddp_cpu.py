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
