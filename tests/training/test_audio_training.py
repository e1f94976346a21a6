"""Stage-A training: the loss falls, exports round-trip bit-exactly, resume continues identically."""

import pytorch_lightning as pl
import torch
from conftest import tiny_module_kwargs

from aniportrait.bundle import Bundle
from aniportrait.data.audio_windows import AudioLandmarkDataModule
from aniportrait.data.sources import ClipSource
from aniportrait.training.audio import AudioLandmarkModule
from aniportrait.training.callbacks import ResumableRandomState
from aniportrait.training.export import export_from_lightning_checkpoint


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(root, steps, tmp_path=None, ckpt_path=None, every=None, **module_overrides):
    pl.seed_everything(0)
    module = AudioLandmarkModule(**tiny_module_kwargs(**module_overrides))
    datamodule = AudioLandmarkDataModule(ClipSource(str(root)), window_frames=30, eval_window_frames=45,
                                         batch_size=4, samples_per_epoch=2000)
    recorder = LossRecorder()
    callbacks = [recorder, ResumableRandomState()]
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                                      filename="step{step}", auto_insert_metric_name=False))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=bool(every),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, recorder.losses


def test_loss_falls(tiny_dataset):
    _, losses = _fit(tiny_dataset, 40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_export_load_round_trip_is_bit_exact(tiny_dataset, tmp_path):
    module, _ = _fit(tiny_dataset, 3)
    bundle = Bundle.open(module.export(tmp_path / "bundle"))
    for name, original in (("audio2mesh", module.audio2mesh), ("audio2pose", module.audio2pose)):
        loaded = bundle.load(name)
        reference = original.state_dict()
        assert loaded.state_dict().keys() == reference.keys()
        assert all(torch.equal(loaded.state_dict()[k], reference[k]) for k in reference), name
    audio = torch.randn(1, 16000)
    with torch.no_grad():
        torch.testing.assert_close(bundle.load("audio2mesh")(audio, 30), module.audio2mesh.eval()(audio, 30), rtol=0, atol=0)
    assert bundle.settings["audio"]["pose"]["identities"] == {f"synthetic_{i:02d}": i for i in range(3)}


def test_resume_continues_with_the_same_losses(tiny_dataset, tmp_path):
    _, straight = _fit(tiny_dataset, 6, tmp_path / "a", every=3)
    checkpoint = tmp_path / "a" / "step3.ckpt"
    assert checkpoint.is_file()
    _, resumed = _fit(tiny_dataset, 6, tmp_path / "b", ckpt_path=str(checkpoint), every=3)
    assert len(resumed) == 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight[3:]), rtol=1e-5, atol=1e-6)
    # and the checkpoint exports to the same bundle weights as the module it came from
    exported = Bundle.open(export_from_lightning_checkpoint(tmp_path / "b" / "step6.ckpt", tmp_path / "from_ckpt"))
    assert exported.has("audio2mesh", "audio2pose")


def test_fine_tuning_starts_from_a_bundle(tiny_dataset, tiny_bundle):
    module, _ = _fit(tiny_dataset, 1, init={"audio2mesh": str(tiny_bundle), "audio2pose": str(tiny_bundle)},
                     optimizer={"_target_": "torch.optim.SGD", "lr": 0.0})
    bundle = Bundle.open(tiny_bundle)
    saved = bundle.state_dict("audio2mesh")
    assert all(torch.equal(module.audio2mesh.state_dict()[k], saved[k]) for k in saved)


def test_single_component_modules(tiny_dataset, tmp_path):
    module, _ = _fit(tiny_dataset, 2, components=["audio2pose"])
    bundle = Bundle.open(module.export(tmp_path / "pose_only"))
    assert bundle.has("audio2pose") and not bundle.has("audio2mesh")
