"""The reliability rules of every entry point (issue 13), one test per rule, each table-driven over the places the
rule applies to:

1. a command never deletes or overwrites a file it did not create unless asked (overwrite=true / --force); an
   output that is an input is refused even then; all before any model loads;
2. every value is checked where it enters (config, CLI, API, batch row, manifest), the allowed range in the message;
3. every file is checked when it is opened;
4. paths with spaces and non-ASCII letters work on every Hydra entry point as typed;
5. SIGINT/SIGTERM leave no temporary files (or the next run removes them) and end non-zero with one line saying
   what was kept and how to resume; model=all resumes;
6. evaluation scores every row over the same clips, says per clip why one was not scored, and fails when nothing
   could be scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, run_cli
from omegaconf import OmegaConf

from aniportrait.audio.io import load_audio
from aniportrait.bundle import Bundle
from aniportrait.cli import bundle as bundle_command
from aniportrait.data.clip import ClipRecord, Manifest, load_landmarks
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import read_image_rgb
from aniportrait.face.retarget import load_pose_template
from aniportrait.metrics.suite import ClipPair, MetricSuite, VideoSample
from aniportrait.models.checkpoints import read_checkpoint, read_training_checkpoint
from aniportrait.utils.atomic import atomic_path
from aniportrait.utils.signals import Interrupted, signals_raise

pytestmark = pytest.mark.filterwarnings("ignore")

ODD = "naïve dir/ü é"  # a space and non-ASCII letters in every path of rule 4


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` -> its sha256: what must not change when a command refuses."""
    files = {}
    for root in roots:
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory) -> dict[str, str]:
    return {"ANIPORTRAIT_DATA": str(tiny_dataset.parent), "ANIPORTRAIT_LOGS": str(tmp_path_factory.mktemp("logs"))}


# -- rule 5 (and the checkpoints rule 1 exports): an interrupted model=all run, then resumed ------------------------


def _run_folder(logs: Path) -> Path | None:
    folders = sorted(logs.glob("train/*/*"))
    return folders[-1] if folders else None


@pytest.fixture(scope="module")
def interrupted_run(env, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`train.py` (model=all without stage 2, to stay quick; 4 steps a stage from the command line), sent SIGTERM
    once stage 1 saved step 2."""
    logs = tmp_path_factory.mktemp("train_logs")
    environment = {**os.environ, **env, "ANIPORTRAIT_LOGS": str(logs), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, str(REPO / "train.py"), "data=synthetic_tiny", "~model.stages.video_stage2",
               "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
               "trainer.log_every_n_steps=1", "validation_video_overrides={num_videos: 1, num_frames: 4, "
               "num_inference_steps: 2}", "held_out_videos.num_frames=4", "held_out_videos.num_inference_steps=2"]
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        run = _run_folder(logs)
        if run is not None and (run / "checkpoints" / "video_stage1" / "step_000002.ckpt").is_file():
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)
    return _run_folder(logs), subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_a_stopped_run_keeps_its_checkpoints_says_so_and_resumes_every_stage(interrupted_run, env):
    run, result = interrupted_run
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM: kept ") and "video_stage1/last.ckpt (stage video_stage1, step" in last
    assert "finished stages: vae, audio" in last and last.endswith(f"to resume: python train.py resume={run}")
    assert not [path for path in run.rglob("*") if ".tmp" in path.name], "temporary files left behind"
    stopped_at = torch.load(run / "checkpoints" / "video_stage1" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= stopped_at < 4

    resumed = run_cli("train.py", f"resume={run}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == f"bundle: {run / 'bundle'}"
    output = resumed.stdout + resumed.stderr
    for stage in ("vae", "audio"):
        assert f"Restored all states from the checkpoint at {run / 'checkpoints' / stage / 'last.ckpt'}" in output
    assert f"{run / 'checkpoints' / 'video_stage1' / 'last.ckpt'}" in output
    # trainer.max_steps=4 from the command line won over every stage's own max_steps (500 and 600 in model/all)
    for stage in ("vae", "audio", "video_stage1"):
        assert torch.load(run / "checkpoints" / stage / "last.ckpt", weights_only=True)["global_step"] == 4, stage
    assert set(Bundle.open(run / "bundle").components) >= {"audio2mesh", "reference_unet", "pose_guider"}
    again = run_cli("train.py", f"resume={run}", env=env)
    assert again.returncode == 2 and "has finished" in _error_line(again.stderr)


def test_sigterm_mid_write_leaves_no_temporary_file_and_the_next_run_removes_a_killed_ones(tmp_path):
    target = tmp_path / "out" / "video.mp4"
    with pytest.raises(Interrupted) as stopped, signals_raise():
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a video")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert stopped.value.signal_name == "SIGTERM" and not list(target.parent.iterdir())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended: what a SIGKILLed run leaves looks like this
    left = [target.parent / f".video.{dead_pid}.abcd_123.tmp.mp4", target.parent / f".bundle.{dead_pid}.zzzz0000.tmp"]
    left[0].write_bytes(b"partial")
    left[1].mkdir()
    alive = target.parent / f".other.{os.getpid()}.abcdefgh.tmp.mp4"  # a write in progress in this process
    alive.write_bytes(b"in progress")
    user_file = target.parent / ".video.12.notes.tmp.txt"  # not our naming: never touched
    user_file.write_bytes(b"mine")
    from aniportrait.data.video import probe_video, write_video
    from aniportrait.utils import atomic

    atomic._cleaned.discard(target.parent.resolve())
    write_video(target, np.zeros((3, 16, 16, 3), np.uint8), 30.0)  # the next write into the folder sweeps it
    assert probe_video(target).frames == 3
    assert not any(path.exists() for path in left) and alive.exists() and user_file.exists()


# -- rule 1: nothing is destroyed without being asked ---------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tiny_bundle, tmp_path_factory) -> Path:
    """An official-layout audio2mesh.pt (the tiny bundle's weights), imported with --architecture-from tiny_bundle."""
    folder = tmp_path_factory.mktemp("release")
    torch.save(Bundle.open(tiny_bundle).load("audio2mesh").state_dict(), folder / "audio2mesh.pt")
    return folder


BUNDLE_CASES = ["import: OUT is the release folder", "import: OUT is a folder of other files",
                "import: OUT is a bundle", "export: OUT holds the checkpoint", "export: OUT is a folder of other files",
                "export: OUT is a bundle"]


@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_bundle_commands_never_destroy_what_they_did_not_write(case, release, tiny_bundle, interrupted_run, tmp_path,
                                                               capsys):
    run, _ = interrupted_run
    out = tmp_path / "out"
    if "release folder" in case:
        out = release
    elif "holds the checkpoint" in case:
        out.mkdir()
        (out / "last.ckpt").write_bytes((run / "checkpoints" / "audio" / "last.ckpt").read_bytes())
    elif "other files" in case:
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    else:
        out.mkdir()
        (out / "aniportrait.yaml").write_text("format: aniportrait-bundle\nformat_version: 1\ncomponents: {}\n")
    checkpoint = out / "last.ckpt" if "holds the checkpoint" in case else run / "checkpoints" / "audio" / "last.ckpt"
    if case.startswith("import"):
        argv = ["import-official", str(release), str(out), "--architecture-from", str(tiny_bundle), "--link"]
    else:
        argv = ["export", str(checkpoint), str(out)]
    before = _snapshot(out, release, checkpoint)
    assert bundle_command(argv) == 2
    message = _error_line(capsys.readouterr().err)
    assert str(out) in message or str(out.resolve()) in message
    assert _snapshot(out, release, checkpoint) == before
    if case.endswith("is a bundle"):  # --force replaces a bundle, and only a bundle
        assert bundle_command([*argv, "--force"]) == 0
        assert "audio2mesh" in Bundle.open(out).components
    else:
        assert bundle_command([*argv, "--force"]) == 2 and _snapshot(out, release, checkpoint) == before


def test_hydra_entry_points_refuse_to_replace_what_another_run_wrote(env, tmp_path):
    evaluated = tmp_path / "evaluated"
    evaluated.mkdir()
    (evaluated / "metrics.json").write_text("{}")
    trained = tmp_path / "trained"
    (trained / "checkpoints").mkdir(parents=True)
    (trained / "checkpoints" / "last.ckpt").write_bytes(b"another run's")
    cases = [("evaluate.py", [f"output_dir={evaluated}", f"generated={tmp_path}"], evaluated / "metrics.json"),
             ("train.py", [f"hydra.run.dir={trained}", "model=audio"], trained)]
    for script, args, named in cases:
        before = _snapshot(tmp_path)
        result = run_cli(script, *args, "data=synthetic_tiny", env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        message = _error_line(result.stderr)
        assert str(named) in message and "overwrite=true" in message, message
        after = _snapshot(tmp_path)  # (Hydra adds its .hydra/ config files; nothing that was there changes)
        assert {key: after.get(key) for key in before} == before


# -- rule 2: values are checked where they enter --------------------------------------------------------------------


def _manifest_entry(**change) -> dict:
    entry = {"id": "c", "split": "test", "identity": "a", "fps": 30, "frames": 10, "width": 64, "height": 64,
             "duration_s": 0.33, "source": "s", "video": "v.mp4", "landmarks": "l.npz"}
    return {**entry, **change}


def test_every_value_is_checked_where_it_enters():
    from aniportrait.evaluation import _check_settings
    from aniportrait.inference import resolve_device
    from aniportrait.training.run import _check_loader, _check_trainer

    cases = [
        (lambda: _check_trainer(OmegaConf.create({"max_steps": "abc"})), "trainer.max_steps='abc': give a whole number >= -1"),
        (lambda: _check_trainer(OmegaConf.create({"max_steps": -5})), "trainer.max_steps=-5"),
        (lambda: _check_trainer(OmegaConf.create({"max_steps": 3, "val_check_interval": 0})), "trainer.val_check_interval=0"),
        (lambda: _check_trainer(OmegaConf.create({"max_steps": 3, "accumulate_grad_batches": 0})),
         "trainer.accumulate_grad_batches=0: give a whole number >= 1"),
        (lambda: ClipRecord.from_dict(_manifest_entry(fps=-30), "m.jsonl"), "m.jsonl: clip 'c' fps=-30: give a number > 0"),
        (lambda: ClipRecord.from_dict(_manifest_entry(frames=0), "m.jsonl"), "clip 'c' frames=0: give a whole number >= 1"),
        (lambda: _check_settings(OmegaConf.create({"num_workers": -1}), {}), "num_workers=-1: give a whole number >= 0"),
        (lambda: _check_settings(OmegaConf.create({}), {"frames_per_clip": 0}), "protocol.frames_per_clip=0"),
        (lambda: _check_settings(OmegaConf.create({}), {"fps": 0}), "protocol.fps=0: give a number > 0"),
        (lambda: _check_loader("audio", OmegaConf.create({"batch_size": 0})),
         "model.stages.audio.loader.batch_size=0: give a whole number >= 1"),
        (lambda: resolve_device("tpu"), "device='tpu': use auto, cpu, cuda or cuda:N"),
    ]
    for call, message in cases:
        with pytest.raises(AniPortraitError) as error:
            call()
        assert message in str(error.value), (message, str(error.value))


def test_a_bad_value_on_the_command_line_is_one_error_before_any_work(env):
    result = run_cli("train.py", "trainer.max_steps=abc", "data=synthetic_tiny", env=env)
    assert result.returncode == 2
    assert "trainer.max_steps='abc': give a whole number >= -1" in _error_line(result.stderr)
    assert "training stage" not in result.stdout + result.stderr
    # a value only the library behind a config group knows is wrong: its own reason, still one line
    result = run_cli("train.py", "model=audio", "trainer.precision=abc", "data=synthetic_tiny", env=env)
    assert result.returncode == 2 and "Precision 'abc' is invalid" in _error_line(result.stderr)


# -- rule 3: files are checked when they are opened ----------------------------------------------------------------


def test_every_file_is_checked_when_opened(tiny_bundle, tiny_dataset, interrupted_run, tmp_path):
    clip = tiny_dataset / "clips" / Manifest.load(tiny_dataset).records[0].id
    run, _ = interrupted_run

    def half(source: Path, name: str) -> Path:
        data = source.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        return tmp_path / name

    def samples(name: str, value: float) -> Path:
        audio = np.zeros(16000, np.float32)
        audio[8000] = value
        soundfile.write(tmp_path / name, audio, 16000, subtype="FLOAT")
        return tmp_path / name

    (tmp_path / "empty.png").write_bytes(b"")
    np.save(tmp_path / "template.npy", np.zeros((10, 6)))
    broken_bundle = tmp_path / "bundle"
    broken_bundle.mkdir()
    for file in Path(tiny_bundle).iterdir():
        (broken_bundle / file.name).write_bytes(file.read_bytes())
    half(Path(tiny_bundle) / "audio2mesh.safetensors", "bundle/audio2mesh.safetensors")
    cases = [
        (lambda: read_image_rgb(tmp_path / "empty.png"), "empty.png is empty (0 bytes)"),
        (lambda: load_audio(samples("nan.wav", np.nan)), "nan.wav holds 1 NaN or infinite samples (the first at 0.500 s)"),
        (lambda: load_audio(samples("inf.wav", np.inf)), "inf.wav holds 1 NaN or infinite samples"),
        (lambda: load_landmarks(half(clip / "landmarks.npz", "truncated.npz")), "truncated.npz (File is not a zip file)"),
        (lambda: load_landmarks(tmp_path / "empty.png"), "empty.png is empty (0 bytes)"),
        (lambda: load_pose_template(half(tmp_path / "template.npy", "template_half.npy")), "template_half.npy"),
        (lambda: read_checkpoint(broken_bundle / "audio2mesh.safetensors"), "is not a readable .safetensors file"),
        (lambda: Bundle.open(broken_bundle).load("audio2mesh"), "truncated or corrupt"),
        (lambda: read_training_checkpoint(tmp_path / "missing.ckpt"), "ckpt_path=" + str(tmp_path / "missing.ckpt")),
        (lambda: read_training_checkpoint(half(run / "checkpoints" / "audio" / "last.ckpt", "half.ckpt")),
         "half.ckpt is not a complete checkpoint"),
        (lambda: read_training_checkpoint(tmp_path), "a folder"),
    ]
    for call, message in cases:
        with pytest.raises(AniPortraitError) as error:
            call()
        assert message in str(error.value), (message, str(error.value))


# -- rule 4: paths with spaces and non-ASCII letters ---------------------------------------------------------------


def test_paths_with_spaces_and_non_ascii_letters_reach_every_entry_point(env, tiny_bundle, tiny_dataset, tmp_path):
    from aniportrait.cli import _quote_values

    odd = tmp_path / ODD
    odd.mkdir(parents=True)
    assert _quote_values([f"reference={odd}/a=b's.png", "steps=3", "-m", "seed=1,2"]) == [
        f"reference='{odd}/a=b\\'s.png'", "steps=3", "-m", "seed=1,2"]
    clip = tiny_dataset / "clips" / Manifest.load(tiny_dataset).records[0].id
    (odd / "pose ü.npz").write_bytes((clip / "landmarks.npz").read_bytes())
    (odd / "spé ech.wav").write_bytes((clip / "audio.wav").read_bytes())
    result = run_cli("infer.py", "mode=landmarks", f"bundle={tiny_bundle}", f"reference={odd / 'pose ü.npz'}",
                     f"audio={odd / 'spé ech.wav'}", f"output={odd / 'out put.mp4'}", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (odd / "out put.mp4").is_file() and (odd / "out put.npz").is_file()
    for script, args, named in [("train.py", ["model=audio", f"ckpt_path={odd / 'x y.ckpt'}"], odd / "x y.ckpt"),
                                ("evaluate.py", [f"generated={odd}"], odd)]:
        result = run_cli(script, "data=synthetic_tiny", *args, env=env)
        assert result.returncode == 2 and str(named) in _error_line(result.stderr), result.stderr[-2000:]


# -- rule 6: evaluation ---------------------------------------------------------------------------------------------


def _sample(frames: np.ndarray, faces: bool) -> VideoSample:
    count = len(frames)
    lmks = np.tile(np.linspace(0.2, 0.8, 478 * 3, dtype=np.float32).reshape(1, 478, 3), (count, 1, 1))
    sample = VideoSample(torch.from_numpy(frames), 30.0, None)
    sample.landmarks = {"lmks": lmks, "blendshapes": np.zeros((count, 52), np.float32), "valid": np.full(count, faces)}
    if not faces:
        sample.notes["landmarks"] = "no face found in any frame"
    return sample


def test_every_row_covers_the_same_clips_and_says_what_was_left_out():
    rng = np.random.default_rng(0)
    suite = MetricSuite({"ssim": True, "psnr": True, "landmarks": "landmarker.task"}, {}, {"sanity": True},
                        torch.device("cpu"), enabled={"ssim", "psnr", "landmarks"})
    for clip, generated in (("faceless", "noise"), ("missing", None), ("good", "blurred")):
        truth = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
        reference = _sample(truth, faces=True)
        pair = ClipPair(clip, reference)
        pair.status["generated"] = "ok" if generated else "missing"
        if generated == "noise":
            pair.methods["generated"] = _sample(rng.integers(0, 255, truth.shape, dtype=np.uint8), faces=False)
        elif generated:
            pair.methods["generated"] = _sample((truth // 2 + 60).astype(np.uint8), faces=True)
        pair.methods.update(ground_truth=reference, copy_reference=_sample(np.repeat(truth[:1], 4, axis=0), faces=True))
        pair.status.update(ground_truth="ok", copy_reference="ok")
        rows = suite.score(pair)
        if clip == "missing":
            assert [row["status"] for row in rows][0] == "missing"
            assert all(row["status"].startswith("not scored: generated video missing") for row in rows[1:])
            assert not any("ssim" in row for row in rows)
        if clip == "faceless":
            copy_row = next(row for row in rows if row["method"] == "copy_reference")
            assert "lmd_face" in copy_row and "in no row's average (generated: no face found in any frame)" in copy_row["notes"]
    summary = suite.summary(["generated", "ground_truth", "copy_reference"])
    assert summary["ground_truth"]["ssim"] == pytest.approx(1.0) and summary["generated"]["lmd_face"] is not None
    # every row: the frames of the two scored clips for SSIM, the one clip with faces in every row for LMD
    for method in ("generated", "ground_truth", "copy_reference"):
        assert suite._counts[method]["ssim"] == 8 and suite._counts[method]["lmd_face"] == 4, method
    assert set(suite.left_out["lmd_face"]) == {"faceless", "missing"} and set(suite.left_out["ssim"]) == {"missing"}
    assert suite.left_out["lmd_face"]["faceless"] == "generated: no face found in any frame"


def test_evaluate_fails_when_nothing_could_be_scored(env, tiny_dataset, tmp_path):
    test_clips = [record.id for record in Manifest.load(tiny_dataset).split("test")]
    empty, corrupt = tmp_path / "empty", tmp_path / "corrupt"
    empty.mkdir()
    (empty / "notes.mp4").write_bytes(b"x")
    corrupt.mkdir()
    for clip in test_clips:
        (corrupt / f"{clip}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    fast = ["metrics.enabled=[ssim,psnr]", "metrics.download=false", "num_workers=0", "protocol.frames_per_clip=8"]
    for folder, named in ((empty, f"expected names like {test_clips[0]}.mp4; the folder has notes.mp4"),
                          (corrupt, f"none of the {len(test_clips)} clips has a usable generated video ({test_clips[0]}: corrupt")):
        out = tmp_path / f"results_{folder.name}"
        result = run_cli("evaluate.py", f"generated={folder}", "data=synthetic_tiny", f"output_dir={out}", *fast, env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert named in _error_line(result.stderr)
        assert not (out / "metrics.json").exists()


def test_interrupt_message_and_status_name_what_was_kept():
    from aniportrait.utils.signals import exit_status, message

    error = Interrupted("SIGTERM", kept="out/a.mp4 (1 of 3 jobs)")
    assert exit_status(error) == 143 and exit_status(Interrupted("SIGINT")) == 130
    assert message(error, kept="default", resume="rerun python infer.py x=1") == (
        "interrupted by SIGTERM: kept out/a.mp4 (1 of 3 jobs); to resume: rerun python infer.py x=1")
    assert "\n" not in message(Interrupted("SIGINT"), "nothing", "rerun")


# -- the same rules in inference (the API, infer.py, batch rows) ----------------------------------------------------


@pytest.fixture(scope="module")
def clip_files(tiny_dataset) -> dict[str, Path]:
    clip = tiny_dataset / "clips" / Manifest.load(tiny_dataset).split("test")[0].id
    return {"landmarks": clip / "landmarks.npz", "audio": clip / "audio.wav", "video": clip / "video.mp4"}


@pytest.fixture(scope="module")
def ap(tiny_bundle):
    from aniportrait.api import AniPortrait

    return AniPortrait.from_pretrained(tiny_bundle, device="cpu")


def test_inference_never_destroys_an_input_or_a_file_it_did_not_write(ap, clip_files, tmp_path, env):
    user_file = tmp_path / "mine.mp4"
    user_file.write_bytes(b"my own video")
    copy = tmp_path / "clip"
    copy.mkdir()
    for path in clip_files.values():
        (copy / path.name).write_bytes(path.read_bytes())
    lmks, audio, video = copy / "landmarks.npz", copy / "audio.wav", copy / "video.mp4"
    cases = [  # (method, arguments, what the error names)
        (ap.animate_from_video, {"image_path": lmks, "video_path": video, "output_path": video}, f"input video={video}"),
        (ap.animate, {"image_path": lmks, "audio_path": video, "output_path": video}, f"input audio={video}"),
        (ap.landmarks, {"image_path": lmks, "audio_path": audio, "output_path": copy / "landmarks.mp4"},
         f"output (its .npz)={lmks} is the same file as the input reference={lmks}"),
        (ap.landmarks, {"image_path": lmks, "audio_path": audio, "output_path": user_file},
         f"output={user_file} exists and this command did not write it; add overwrite=true"),
        (ap.landmarks, {"image_path": lmks, "audio_path": audio, "output_path": copy / "landmarks.mp4", "overwrite": True},
         "writing it would destroy the input"),  # asking to overwrite never covers an input
    ]
    before = _snapshot(tmp_path)
    for method, arguments, named in cases:
        with pytest.raises(AniPortraitError) as error:
            method(**arguments, progress=False)
        assert named in str(error.value), (named, str(error.value))
    assert _snapshot(tmp_path) == before and ap._motion_model is None and ap._pipeline is None  # no model loaded
    done = ap.landmarks(image_path=lmks, audio_path=audio, output_path=user_file, overwrite=True, progress=False, length=3)
    assert done.frames == 3 and user_file.read_bytes() != b"my own video"

    # infer.py: the clip's own landmarks.npz as reference, output beside it (issue 13's example 3)
    result = run_cli("infer.py", "mode=landmarks", f"bundle={ap.bundle.path}", f"reference={lmks}", f"audio={audio}",
                     f"output={copy / 'landmarks.mp4'}", env=env)
    assert result.returncode == 2 and f"is the same file as the input reference={lmks}" in _error_line(result.stderr)
    assert _snapshot(copy) == {key: value for key, value in before.items() if key.startswith(str(copy))}


def test_batch_rows_naming_the_same_output_are_refused_before_any_job_runs(ap, clip_files, tmp_path):
    from aniportrait.inference import read_manifest

    manifest = tmp_path / "jobs.csv"
    manifest.write_text("image,audio,output,mode\n"
                        f"{clip_files['landmarks']},{clip_files['audio']},out/a.mp4,landmarks\n"
                        f"{clip_files['landmarks']},{clip_files['audio']},out/b.mp4,landmarks\n"
                        f"{clip_files['landmarks']},{clip_files['audio']},out/a.mp4,landmarks\n")
    with pytest.raises(AniPortraitError, match=rf"line 4: output={tmp_path / 'out' / 'a.mp4'} is the same file as "
                                               rf".*line 2: output="):
        read_manifest(manifest)
    jobs = [{"image_path": clip_files["landmarks"], "audio_path": clip_files["audio"], "mode": "landmarks",
             "output_path": tmp_path / name} for name in ("x.mp4", "x.mp4")]
    with pytest.raises(AniPortraitError, match="job 2: output=.*x.mp4 is the same file as job 1: output="):
        ap.animate_batch(jobs, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.mp4").exists()


def test_inference_values_are_checked_where_they_enter(ap, clip_files, tmp_path, env):
    from aniportrait.inference import AnimationOptions, read_manifest

    cases = [({"steps": 0}, "steps=0: give a whole number >= 1 and <= 1000"), ({"steps": -3}, "steps=-3"),
             ({"steps": "abc"}, "steps='abc'"), ({"fps": -30}, "fps=-30: give a number > 0"), ({"fps": 0}, "fps=0"),
             ({"guidance": -1}, "guidance=-1: give a number >= 0"), ({"length": 0}, "length=0"),
             ({"width": 500}, "width=500: give a multiple of 8"), ({"seed": -1}, "seed=-1"),
             ({"chunk_frames": 8, "chunk_overlap": 8}, "chunk_overlap=8"), ({"keyframe_interval": 0}, "keyframe_interval=0"),
             ({"pose_source": "sideways"}, "pose_source='sideways': choose one of auto, predicted"),
             ({"size": 7}, "size=7"), ({"progress": "maybe"}, "progress='maybe': give true or false")]
    for options, message in cases:
        with pytest.raises(AniPortraitError) as error:
            AnimationOptions.from_kwargs(**options)
        assert message in str(error.value), (options, str(error.value))
    fresh = type(ap).from_pretrained(ap.bundle.path, device="cpu")
    with pytest.raises(AniPortraitError, match=r"identity=500: give a whole number >= 0 and <= 99"):
        fresh.landmarks(image_path=clip_files["landmarks"], audio_path=clip_files["audio"],
                        output_path=tmp_path / "i.mp4", identity=500)
    assert fresh._motion_model is None  # refused before the models load
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"image": str(clip_files["landmarks"]), "audio": str(clip_files["audio"]),
                                    "output": "o.mp4", "steps": 0}) + "\n")
    with pytest.raises(AniPortraitError, match=r"jobs.jsonl line 1: steps=0"):
        read_manifest(manifest)
    result = run_cli("infer.py", "mode=audio", f"bundle={ap.bundle.path}", f"reference={clip_files['landmarks']}",
                     f"audio={clip_files['audio']}", f"output={tmp_path / 'x.mp4'}", "steps=abc", env=env)
    assert result.returncode == 2 and "steps='abc': give a whole number >= 1" in _error_line(result.stderr)


def test_inference_files_are_checked_when_opened(ap, clip_files, tmp_path):
    from aniportrait.inference import AnimationOptions, WaveformAudioProcessor, pose_frames_from_file

    data = clip_files["landmarks"].read_bytes()
    (tmp_path / "poses.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(AniPortraitError, match=r"cannot read pose input .*poses.npz .*truncated or corrupt"):
        pose_frames_from_file(tmp_path / "poses.npz", (64, 64), AnimationOptions(), 30.0)
    samples = np.zeros(1600, np.float32)
    samples[400] = np.inf
    with pytest.raises(AniPortraitError, match=r"the audio array holds 1 NaN or infinite samples \(the first at 0.025 s\)"):
        WaveformAudioProcessor().process(samples)


def test_a_driving_video_that_loses_the_face_says_where_and_what_was_done(clip_files, tmp_path, caplog):
    from conftest import shared_path

    from aniportrait.data.video import probe_video, read_video, write_video
    from aniportrait.inference import AnimationOptions, load_reference, motion_from_video

    model = shared_path("samples", "models", "face_landmarker_v2_with_blendshapes.task")
    source = shared_path("samples", "video", "liveportrait_d9_10s.mp4")
    frames = read_video(source, list(range(16)), size=(256, 256)).copy()
    frames[6:10] = 0  # the face leaves for four frames
    write_video(tmp_path / "driver.mp4", frames, probe_video(source).fps)
    portrait = load_reference(clip_files["landmarks"])
    with caplog.at_level("WARNING"):
        motion = motion_from_video(portrait, tmp_path / "driver.mp4", AnimationOptions(), str(model))
    assert len(motion.meshes) == 16 and np.isfinite(motion.meshes).all()
    assert "no face in frames 6-9 (4 of 16" in caplog.text and "interpolated between the nearest frames" in caplog.text


def test_an_interrupted_batch_says_what_it_finished(ap, clip_files, tmp_path):
    calls = []

    def landmarks(**arguments):
        calls.append(arguments["output_path"])
        if len(calls) == 2:
            raise Interrupted("SIGTERM")
        return AnimationResultStub(arguments["output_path"])

    class AnimationResultStub:
        def __init__(self, output):
            self.output = output

    jobs = [{"image_path": clip_files["landmarks"], "audio_path": clip_files["audio"], "mode": "landmarks",
             "output_path": tmp_path / f"{name}.mp4"} for name in ("a", "b", "c")]
    ap.landmarks = landmarks  # the method a landmarks job runs, as an interrupted job would end
    try:
        with pytest.raises(Interrupted) as stopped:
            ap.animate_batch(jobs, progress=False)
    finally:
        del ap.landmarks
    assert stopped.value.kept.startswith("1 outputs finished in this run, 1 of 3 jobs handled")
    assert stopped.value.resume == "rerun the same command: finished outputs are skipped" and len(calls) == 2
