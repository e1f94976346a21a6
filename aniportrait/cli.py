"""Entry points shared by ``train.py``/``evaluate.py``/``infer.py`` and the ``aniportrait-*`` console scripts.

Each takes Hydra ``key=value`` overrides. Bad input ends with one ``error: ...`` line on stderr and exit
status 2; an unknown config key is reported the same way before anything runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from aniportrait.errors import AniPortraitError

__all__ = ["train", "evaluate", "infer", "config_dir"]

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


def _check_overrides(conf: Path, config_name: str, overrides: list[str]) -> None:
    """Compose once to turn Hydra's multi-line override errors into one line naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if any(arg.startswith("-") for arg in overrides) or any("," in arg.partition("=")[2] for arg in overrides):
        return  # flags (--help, --cfg, -m) and sweeps: leave them to Hydra
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="check"):
            compose(config_name=config_name, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as error:
        text = " ".join(str(error).split())
        bad = next((arg for arg in overrides if arg.partition("=")[0].lstrip("+~") in text), None)
        hint = f" (from `{bad}`)" if bad else ""
        _fail(f"config error{hint}: {text} — check the key against `python {config_name}.py --cfg job`, "
              "or add a new key with +key=value")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)  # usable before Hydra's runtime config exists


def run_hydra(config_name: str, task: Callable, argv: list[str] | None = None):
    """Run ``task(cfg)`` under Hydra with the project's conf/ folder and our error handling."""
    import hydra

    _register_resolvers()

    try:
        conf = config_dir()
    except AniPortraitError as error:
        _fail(str(error))
    overrides = _rewrite_path_groups(list(sys.argv[1:] if argv is None else argv), conf)
    _check_overrides(conf, config_name, overrides)

    def guarded(cfg):
        try:
            return task(cfg)
        except AniPortraitError as error:
            _fail(str(error))

    sys.argv = [sys.argv[0], *overrides]
    return hydra.main(version_base="1.3", config_path=str(conf), config_name=config_name)(guarded)()


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


def _infer_task(cfg):
    from aniportrait.inference import infer as infer_run

    return infer_run(cfg)


def train(argv: list[str] | None = None):
    return run_hydra("train", _train_task, argv)


def evaluate(argv: list[str] | None = None):
    return run_hydra("evaluate", _evaluate_task, argv)


def infer(argv: list[str] | None = None):
    return run_hydra("infer", _infer_task, argv)
