"""Entry points: ``train.py``/``evaluate.py``/``infer.py``, the ``aniportrait-*`` console scripts and
``python -m aniportrait.bundle``; the top of the import order (nothing of ours imports this module).

The Hydra ones take ``key=value`` overrides. Bad input ends with one ``error: ...`` line on stderr and exit
status 2; an unknown config key is reported the same way before anything runs. Values that Hydra's grammar
would reject unquoted (paths with spaces, non-ASCII letters, ``=``) are quoted here, so ``reference=/my photos/
café.png`` works as typed. SIGINT/SIGTERM end with one ``interrupted by ...: kept ...; to resume: ...`` line and
status 128 + the signal number; temporary files are removed first. ``train.py resume=RUN_DIR`` replays that
run's overrides and continues in its folder. ``infer.py mode=...`` builds an
:class:`~aniportrait.api.AniPortrait` and calls the method of its mode (:data:`INFER_MODES`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aniportrait.errors import AniPortraitError
from aniportrait.utils import signals, values

__all__ = ["train", "evaluate", "infer", "bundle", "config_dir", "INFER_MODES", "infer_task", "options_from_config"]

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """conf/ of this checkout (``pip install -e .``), or ANIPORTRAIT_CONFIG_DIR."""
    env = os.environ.get("ANIPORTRAIT_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent / "conf")
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate
    raise AniPortraitError(
        "cannot find the conf/ folder: install the project from its checkout with `pip install -e .` "
        "or set ANIPORTRAIT_CONFIG_DIR to the conf/ folder"
    )


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _rewrite_path_groups(argv: list[str], conf: Path) -> list[str]:
    """``data=/some/folder`` -> ``data=clips data.root=/some/folder`` (a path instead of a group option)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "data" and sep and value and not (conf / "data" / f"{value}.yaml").is_file() and (
            "/" in value or Path(value).expanduser().is_dir()
        ):
            out += ["data=clips", f"data.root={Path(value).expanduser().resolve()}"]
        else:
            out.append(arg)
    return out


def _quote_values(overrides: list[str]) -> list[str]:
    """``key=/my photos/café.png`` -> ``key='/my photos/café.png'``: only where Hydra cannot parse the value as typed
    and the quoted form reads back as exactly that text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if arg.startswith("-") or not sep:
            out.append(arg)
            continue
        try:
            parser.parse_override(arg)
            out.append(arg)
            continue
        except HydraException:
            pass
        quoted = f"{key}='" + value.replace("\\'", "\\\\'").replace("'", "\\'") + "'"
        try:
            out.append(quoted if parser.parse_override(quoted).value() == value else arg)
        except HydraException:
            out.append(arg)
    return out


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _resume_overrides(overrides: list[str]) -> list[str]:
    """``resume=RUN_DIR``: that run's own overrides (.hydra/overrides.yaml) first, then the ones given now, and
    the run folder as Hydra's output folder, so the run continues where it was."""
    import yaml

    given = [arg for arg in overrides if _key(arg) == "resume"]
    if not given or not given[-1].partition("=")[2]:
        return overrides
    run_dir = Path(given[-1].partition("=")[2].strip("'\"")).expanduser().resolve()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        _fail(f"resume={run_dir}: not the folder of a training run (no .hydra/overrides.yaml); give the run folder "
              "printed when it stopped (logs/train/<date>/<time>)")
    keys = {_key(arg) for arg in overrides}
    replayed = [arg for arg in (yaml.safe_load(saved.read_text()) or [])
                if _key(arg) not in keys and _key(arg) not in ("resume", "overwrite")]
    kept = [arg for arg in overrides if _key(arg) not in ("resume", "hydra.run.dir")]
    return [*replayed, *kept, f"resume={run_dir}", f"hydra.run.dir={run_dir}"]


def _check_overrides(conf: Path, config_name: str, overrides: list[str]) -> None:
    """Compose once to turn Hydra's multi-line override errors into one line naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(arg.startswith("-") for arg in overrides) or any("," in arg.partition("=")[2] for arg in overrides):
        return  # flags (--help, --cfg, -m) and sweeps: leave them to Hydra
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="check"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        text = " ".join(str(error).split())
        bad = next((arg for arg in overrides if arg.partition("=")[0].lstrip("+~") in text), None)
        hint = f" (from `{bad}`)" if bad else ""
        _fail(f"config error{hint}: {text} — check the key against `python {config_name}.py --cfg job`, "
              "or add a new key with +key=value")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)  # usable before Hydra's runtime config exists


def _interrupted(error: BaseException, kept: str, resume: str) -> None:
    sys.exit(signals.report(error, kept, resume))


def run_hydra(config_name: str, task: Callable, argv: list[str] | None = None, kept: str = "nothing"):
    """Run ``task(cfg)`` under Hydra with the project's conf/ folder and our error handling. ``kept``: what an
    interrupted run of this task leaves (unless the task's :class:`~aniportrait.utils.signals.Interrupted` says)."""
    import hydra

    _register_resolvers()
    given = list(sys.argv[1:] if argv is None else argv)
    rerun = "rerun " + shlex.join(["python", f"{config_name}.py", *given])
    with signals.signals_raise():
        try:
            try:
                conf = config_dir()
            except AniPortraitError as error:
                _fail(str(error))
            overrides = _rewrite_path_groups(given, conf)
            if config_name == "train":
                overrides = _resume_overrides(overrides)
            overrides = _quote_values(overrides)
            _check_overrides(conf, config_name, overrides)

            def guarded(cfg):
                from hydra.errors import InstantiationException

                try:
                    return task(cfg)
                except AniPortraitError as error:
                    _fail(str(error))
                except InstantiationException as error:  # a constructor refused a config value
                    cause = error.__cause__
                    if isinstance(cause, AniPortraitError):
                        _fail(str(cause))
                    _fail(f"config error: {' '.join(str(error).split())} — check that key against "
                          f"`python {config_name}.py --cfg job`")

            sys.argv = [sys.argv[0], *overrides]
            return hydra.main(version_base="1.3", config_path=str(conf), config_name=config_name)(guarded)()
        except (signals.Interrupted, KeyboardInterrupt) as error:
            _interrupted(error, kept, rerun)


def _train_task(cfg):
    from aniportrait.training.run import print_metrics
    from aniportrait.training.run import train as train_run

    metrics, bundle = train_run(cfg)
    print_metrics(metrics)
    if bundle is not None:
        print(f"bundle: {bundle}", flush=True)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


def _evaluate_task(cfg):
    from aniportrait.evaluation import evaluate as evaluate_run

    return evaluate_run(cfg)


def train(argv: list[str] | None = None):
    return run_hydra("train", _train_task, argv, kept="no checkpoint (training had not started)")


def evaluate(argv: list[str] | None = None):
    return run_hydra("evaluate", _evaluate_task, argv,
                     kept="no results (metrics.json and clips.csv are written when scoring ends; no partial file)")


def infer(argv: list[str] | None = None):
    return run_hydra("infer", infer_task, argv, kept="finished outputs only (no partial file)")


# -- infer.py: its modes ------------------------------------------------------------------------------------


def options_from_config(cfg: DictConfig) -> dict[str, Any]:
    """infer.py keys -> AnimationOptions fields (``pose.*`` and ``stream.*`` flattened)."""
    pose = cfg.get("pose") or {}
    stream = cfg.get("stream") or {}
    interpolator = cfg.get("interpolator")
    return {  # as given: AnimationOptions checks and types every value (steps=abc is one error naming steps)
        "width": cfg.get("width"), "height": cfg.get("height"), "fps": cfg.get("fps"), "length": cfg.get("length"),
        "steps": cfg.get("steps"), "guidance": cfg.get("guidance"), "seed": cfg.get("seed", 42),
        "context_frames": cfg.get("context_frames"), "context_overlap": cfg.get("context_overlap"),
        "window_batch": cfg.get("window_batch", 1), "decode_batch": cfg.get("decode_batch"),
        "encoder_threads": cfg.get("encoder_threads"),
        "deep_cache_interval": cfg.get("deep_cache_interval"),
        "scheduler": OmegaConf.to_container(cfg.scheduler) if isinstance(cfg.get("scheduler"), DictConfig)
        else cfg.get("scheduler"), "sampling": cfg.get("sampling"),
        "keyframe_interval": cfg.get("keyframe_interval") or 1,
        "interpolator": OmegaConf.to_container(interpolator) if isinstance(interpolator, DictConfig) else interpolator,
        "chunk_frames": stream.get("chunk_frames"), "chunk_overlap": stream.get("chunk_overlap", 8),
        "first_chunk_frames": stream.get("first_chunk_frames"),
        "pose_source": pose.get("source", "auto"), "pose_template": pose.get("template"),
        "rotation_scale": pose.get("rotation_scale"), "smooth_window": pose.get("smooth_window"),
        "identity": cfg.get("identity"), "reference_frame": cfg.get("reference_frame", 0),
        "size": cfg.get("size", 512), "progress": cfg.get("progress", True), "overwrite": cfg.get("overwrite", False),
    }


def _need(cfg: DictConfig, key: str, message: str) -> Any:
    if not cfg.get(key):
        raise AniPortraitError(message)
    return cfg[key]


def _portrait(cfg: DictConfig) -> Any:
    return _need(cfg, "reference", f"mode={cfg.mode} needs a portrait: add reference=PATH (an image or a clip's "
                                   "landmarks.npz)")


def _infer_audio(ap, cfg: DictConfig, options: dict[str, Any]):
    audio = _need(cfg, "audio", "mode=audio needs speech: add audio=PATH (wav, flac, mp3, m4a)")
    return ap.animate(image_path=_portrait(cfg), audio_path=audio, output_path=cfg.output, **options)


def _infer_video(ap, cfg: DictConfig, options: dict[str, Any]):
    video = _need(cfg, "video", "mode=video needs a driving video: add video=PATH.mp4")
    return ap.animate_from_video(image_path=_portrait(cfg), video_path=video, output_path=cfg.output, **options)


def _infer_pose(ap, cfg: DictConfig, options: dict[str, Any]):
    if bool(cfg.get("video")) == bool(cfg.get("landmarks")):
        raise AniPortraitError("mode=pose needs exactly one pose input: video=POSE_IMAGES.mp4 or landmarks=POSES.npz")
    return ap.animate_from_landmarks(image_path=_portrait(cfg), landmarks_path=cfg.get("video") or cfg.landmarks,
                                     output_path=cfg.output, audio_path=cfg.get("audio"), **options)


def _infer_landmarks(ap, cfg: DictConfig, options: dict[str, Any]):
    if bool(cfg.get("audio")) == bool(cfg.get("video")):
        raise AniPortraitError("mode=landmarks needs exactly one driver: audio=SPEECH (wav, flac, mp3, m4a) or "
                               "video=DRIVING.mp4")
    return ap.landmarks(image_path=_portrait(cfg), output_path=cfg.output, audio_path=cfg.get("audio"),
                        video_path=cfg.get("video"), **options)


def _infer_batch(ap, cfg: DictConfig, options: dict[str, Any]):
    from aniportrait.inference import read_manifest

    jobs = read_manifest(_need(cfg, "manifest", "mode=batch needs a job list: add manifest=JOBS.csv or JOBS.jsonl"))
    from aniportrait.utils.values import boolean

    results = ap.animate_batch(jobs, skip_existing=boolean("skip_existing", cfg.get("skip_existing", True)), **options)
    failed = [result for result in results if result.status == "failed"]
    if failed:
        raise AniPortraitError(f"{len(failed)} of {len(results)} batch jobs failed (listed above); fix them and rerun: "
                               "finished outputs are skipped")
    return results


INFER_MODES: dict[str, Callable[..., Any]] = {"audio": _infer_audio, "video": _infer_video, "pose": _infer_pose,
                                              "landmarks": _infer_landmarks, "batch": _infer_batch}


def infer_task(cfg: DictConfig):
    """``python infer.py mode=...``: the AniPortrait method of the mode, with the config's options."""
    from aniportrait.api import AniPortrait
    from aniportrait.inference import AnimationOptions, check_output_path

    mode = cfg.get("mode")
    if mode not in INFER_MODES:
        raise AniPortraitError(f"unknown mode={mode!r}; choose one of {', '.join(INFER_MODES)}")
    options = options_from_config(cfg)
    AnimationOptions.from_kwargs(**options)  # every value, before any model loads
    if mode != "batch":
        check_output_path(cfg.get("output"))
    ap = AniPortrait(bundle=cfg.get("bundle"), device=cfg.get("device"), dtype=cfg.get("dtype"),
                     landmarker_model=(cfg.get("face") or {}).get("landmarker_model"), compile=bool(cfg.get("compile")),
                     fast=values.boolean("fast", cfg.get("fast") or False))
    return INFER_MODES[mode](ap, cfg, options)


# -- python -m aniportrait.bundle ----------------------------------------------------------------------------


def bundle(argv: list[str] | None = None) -> int:
    """``python -m aniportrait.bundle export | import-official | info``: see :mod:`aniportrait.bundle`."""
    import aniportrait.bundle as bundles
    from aniportrait.bundle import OFFICIAL_BASE_MODELS, OFFICIAL_FILES
    from aniportrait.utils import signals

    parser = argparse.ArgumentParser(prog="python -m aniportrait.bundle", description=bundles.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="Lightning checkpoint -> bundle")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--force", action="store_true", help="replace an existing bundle at OUT")
    official = commands.add_parser("import-official", help="official release files (.pt/.pth) -> bundle")
    official.add_argument("source", type=Path, help="folder with any of " + ", ".join(OFFICIAL_FILES.values()))
    official.add_argument("out", type=Path)
    official.add_argument("--base-model", help=f"SD-1.5: a local folder or hub id (default {OFFICIAL_BASE_MODELS['base_model']})")
    official.add_argument("--vae", help=f"the VAE: a local folder or hub id (default {OFFICIAL_BASE_MODELS['vae']})")
    official.add_argument("--image-encoder", help="the CLIP image encoder, at its root or in image_encoder/ (default "
                                                  f"{OFFICIAL_BASE_MODELS['image_encoder']})")
    official.add_argument("--architecture-from", type=Path, default=None,
                          help="a bundle whose component classes and configs to use instead of the official ones")
    official.add_argument("--link", action="store_true",
                          help="refer to the release files in place instead of copying them into the bundle")
    official.add_argument("--force", action="store_true", help="replace an existing bundle at OUT")
    info = commands.add_parser("info", help="print what a bundle holds")
    info.add_argument("bundle", type=Path)
    args = parser.parse_args(argv)
    try:
        with signals.signals_raise():
            return _bundle_command(args)
    except AniPortraitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except signals.Interrupted as error:
        return signals.report(error, kept="nothing (the bundle is written under a temporary name, now removed)",
                              resume="rerun the same command")


def _bundle_command(args: argparse.Namespace) -> int:
    """One ``python -m aniportrait.bundle`` subcommand; errors propagate to :func:`bundle`."""
    import yaml

    from aniportrait.bundle import OFFICIAL_BASE_MODELS, OFFICIAL_FILES, Bundle, import_official
    from aniportrait.training.export import export_from_lightning_checkpoint

    if args.command == "export":
        path = export_from_lightning_checkpoint(args.checkpoint, args.out, overwrite=args.force)
        print(f"bundle: {path}")
    elif args.command == "import-official":
        given = {"base_model": args.base_model, "vae": args.vae, "image_encoder": args.image_encoder}
        base_models = {**OFFICIAL_BASE_MODELS, **{k: v for k, v in given.items() if v}} if any(given.values()) else None
        result = import_official(args.source, args.out, base_models=base_models,
                                 architecture=args.architecture_from, link=args.link, overwrite=args.force)
        print("found: " + ", ".join(f"{OFFICIAL_FILES[name]} -> {name}" for name in result.found))
        if result.missing:
            print("not found (the bundle lacks them): " + ", ".join(OFFICIAL_FILES[name] for name in result.missing))
        print(f"bundle: {result.path}")
    elif args.command == "info":
        opened = Bundle.open(args.bundle)
        print(yaml.safe_dump({k: v for k, v in opened.document.items() if k != "components"}, sort_keys=False))
        for name, entry in opened.components.items():
            print(f"{name}: {entry['class']} ({entry.get('num_tensors', '?')} tensors)")
    return 0
