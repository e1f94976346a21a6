"""train.py / infer.py / evaluate.py as a user runs them: outputs, sweeps, loggers and bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from conftest import run_cli

from aniportrait.audio.io import frame_count, load_audio
from aniportrait.bundle import Bundle
from aniportrait.data.clip import Manifest
from aniportrait.data.video import probe_video

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture()
def env(tiny_dataset, tmp_path):
    """Data from the session's tiny dataset; logs in a fresh folder."""
    return {"ANIPORTRAIT_DATA": str(tiny_dataset.parent), "ANIPORTRAIT_LOGS": str(tmp_path / "logs")}


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_train_exports_a_bundle_and_says_so_last(env, tmp_path):
    result = run_cli("train.py", "model=audio", "debug=fast", "data=synthetic_tiny", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    last = _last_line(result.stdout)
    assert last.startswith("bundle: ")
    bundle = Bundle.open(last.removeprefix("bundle: "))
    assert bundle.has("audio2mesh", "audio2pose")
    run_dir = bundle.path.parent
    assert (run_dir / "config_resolved.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "val/mouth_open_corr" in result.stdout
    assert (run_dir / "csv" / "metrics.csv").is_file() and list((run_dir / "previews").glob("*.mp4"))


def test_multirun_sweep_runs_each_trial(env, tmp_path):
    result = run_cli("train.py", "-m", "model=audio", "debug=fast", "data=synthetic_tiny", "model.optimizer.lr=1e-4,3e-4", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    bundles = sorted(Path(env["ANIPORTRAIT_LOGS"]).glob("train/multiruns/*/*/*/bundle/aniportrait.yaml"))
    assert len(bundles) == 2
    rates = {yaml.safe_load((b.parent.parent / "config_resolved.yaml").read_text())["model"]["optimizer"]["lr"] for b in bundles}
    assert rates == {1e-4, 3e-4}


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_optuna_sweep(env):
    result = run_cli("train.py", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "debug=fast", "data=synthetic_tiny", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = list(Path(env["ANIPORTRAIT_LOGS"]).glob("train/multiruns/*/*/optimization_results.yaml"))
    assert len(results) == 1
    summary = yaml.safe_load(results[0].read_text())
    assert "best_value" in summary and "model.optimizer.lr" in summary["best_params"]
    assert len(list(results[0].parent.glob("*/bundle/aniportrait.yaml"))) == 2


def test_wandb_logger_works_offline_without_an_account(env, tmp_path):
    result = run_cli("train.py", "logger=wandb", "model=audio", "debug=fast", "data=synthetic_tiny", env={**env, "WANDB_API_KEY": "",
                                                                                          "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(_last_line(result.stdout).removeprefix("bundle: ")).parent
    assert list(run_dir.glob("wandb/offline-run-*"))


def _clip(tiny_dataset):
    record = Manifest.load(tiny_dataset).split("test")[0]
    return tiny_dataset / record.audio, tiny_dataset / record.landmarks


def test_infer_landmarks_writes_video_with_audio_and_arrays(tiny_bundle, tiny_dataset, tmp_path, env):
    audio, reference = _clip(tiny_dataset)
    output = tmp_path / "nested" / "out.mp4"
    result = run_cli("infer.py", "mode=landmarks", f"bundle={tiny_bundle}", f"audio={audio}", f"reference={reference}",
                     f"output={output}", "size=128", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_frames = frame_count(len(load_audio(audio)), 30)
    info = probe_video(output)
    assert info.frames == expected_frames and info.has_audio and (info.width, info.height) == (128, 128)
    arrays = np.load(output.with_suffix(".npz"))
    assert arrays["meshes"].shape == (expected_frames, 468, 3) and arrays["poses"].shape == (expected_frames, 6)
    assert arrays["landmarks"].shape == (expected_frames, 468, 2)
    assert "s/frame" in result.stdout


def test_silent_audio_is_valid_input(tiny_bundle, tiny_dataset, tmp_path, env):
    _, reference = _clip(tiny_dataset)
    soundfile.write(tmp_path / "silence.wav", np.zeros(16000), 16000)
    result = run_cli("infer.py", f"bundle={tiny_bundle}", f"audio={tmp_path / 'silence.wav'}", f"reference={reference}",
                     f"output={tmp_path / 'silent.mp4'}", "size=64", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert probe_video(tmp_path / "silent.mp4").frames == 30


def test_evaluate_writes_json_and_prints_a_table(tiny_bundle, env):
    result = run_cli("evaluate.py", f"bundle={tiny_bundle}", "data=synthetic_tiny", "split=test", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| mouth_open_corr |" in result.stdout
    metrics_path = Path(_last_line(result.stdout).removeprefix("results: "))
    results = json.loads(metrics_path.read_text())
    assert {"lve", "mve", "mouth_open_corr", "pose_l1"} <= set(results["metrics"])
    assert results["protocol"]["clips"] == 3 and (metrics_path.parent / "clips.csv").is_file()


def _bad_cases(tmp_path, tiny_bundle, tiny_dataset):
    audio, reference = _clip(tiny_dataset)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    soundfile.write(tmp_path / "zero.wav", np.zeros(0), 16000)
    pose_only = tmp_path / "pose_only_bundle"
    shutil.copytree(tiny_bundle, pose_only)
    document = yaml.safe_load((pose_only / "aniportrait.yaml").read_text())
    del document["components"]["audio2mesh"]
    (pose_only / "aniportrait.yaml").write_text(yaml.safe_dump(document))
    arrays = dict(np.load(reference))
    arrays["mesh3d"] = arrays["mesh3d"][:, :400]
    np.savez(tmp_path / "bad_landmarks.npz", **arrays)
    good = {"bundle": str(tiny_bundle), "audio": str(audio), "reference": str(reference)}
    return [
        ({"audio": str(tmp_path / "missing.wav")}, "missing.wav"),
        ({"audio": str(tmp_path / "empty.wav")}, "empty.wav"),
        ({"audio": str(tmp_path / "corrupt.wav")}, "corrupt.wav"),
        ({"audio": str(tmp_path / "zero.wav")}, "zero.wav"),
        ({"bundle": str(tmp_path / "no_such_bundle")}, "no_such_bundle"),
        ({"bundle": str(pose_only)}, "audio2mesh"),
        ({"reference": str(tmp_path / "bad_landmarks.npz")}, "mesh3d has shape"),
    ], good


def test_bad_inputs_give_one_clear_error_and_no_output(tiny_bundle, tiny_dataset, tmp_path, env):
    cases, good = _bad_cases(tmp_path, tiny_bundle, tiny_dataset)
    for change, named in cases:
        args = {**good, **change}
        output = tmp_path / "out" / "result.mp4"
        result = run_cli("infer.py", *(f"{k}={v}" for k, v in args.items()), f"output={output}", env=env)
        stderr_lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
        assert result.returncode == 2, (change, result.stderr[-2000:])
        assert len(stderr_lines) == 1 and named in stderr_lines[0], (change, result.stderr[-2000:])
        assert not output.exists() and not output.with_suffix(".npz").exists()
        assert not [p for p in output.parent.glob("*") if p.is_file()] if output.parent.exists() else True


def test_unknown_config_key_is_one_error_line(env):
    result = run_cli("train.py", "modle.optimizer.lr=1", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "modle" in lines[0]
