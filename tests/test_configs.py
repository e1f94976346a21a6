"""Every config group option composes and its objects instantiate (lightning-hydra-template style)."""

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from aniportrait.cli import _register_resolvers, config_dir
from aniportrait.training.run import _module_config

CONF = config_dir()
GROUPS = ("data", "model", "backbone", "trainer", "logger", "callbacks", "experiment", "debug", "hparams_search")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(config_name: str, overrides: list[str], tmp_path: Path):
    _register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        if "data" in cfg and OmegaConf.is_missing(cfg.data, "root"):
            cfg.data.root = str(tmp_path)
    return cfg


@pytest.mark.parametrize("config_name", ["train", "infer", "evaluate"])
def test_top_level_configs_compose(config_name, tmp_path):
    cfg = _compose(config_name, [], tmp_path)
    assert cfg.task_name == config_name


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "hparams_search":
        overrides.append("hydra/sweeper=optuna")
    cfg = _compose("train", overrides, tmp_path)
    plain = {k: v for k, v in cfg.items() if k != "hydra"}  # hydra's node holds run-time-only values
    OmegaConf.to_container(OmegaConf.create(plain), resolve=True)  # every interpolation resolves
    if group == "data":
        source = hydra.utils.instantiate(cfg.data)
        assert hasattr(source, "resolve")
    elif group == "model":
        stages = dict(cfg.model.stages) if "stages" in cfg.model else {"model": cfg.model}
        for stage_cfg in stages.values():
            module = hydra.utils.instantiate(_module_config(stage_cfg), _recursive_=False)
            datamodule = hydra.utils.instantiate(stage_cfg.loader, source=hydra.utils.instantiate(cfg.data))
            assert module is not None and datamodule is not None
    elif group == "trainer":
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 1
            cfg.trainer.pop("strategy", None) if option in ("fsdp", "deepspeed") else None
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_steps == cfg.trainer.max_steps
    elif group in ("logger", "callbacks"):
        objects = [hydra.utils.instantiate(entry) for entry in cfg[group].values() if "_target_" in entry]
        assert objects


def test_a_stage_may_set_any_trainer_argument(tmp_path):
    """``+model.stages.<stage>.trainer.<key>`` reaches that stage's Trainer even when the trainer group lacks the key;
    the other stages keep the group's settings."""
    from aniportrait.training.run import _stage_trainer

    cfg = _compose("train", ["model=all", "+model.stages.video_stage1.trainer.profiler=simple",
                             "model.stages.vae.trainer.max_steps=7"], tmp_path)
    stage1 = _stage_trainer(cfg, cfg.model.stages.video_stage1)
    vae = _stage_trainer(cfg, cfg.model.stages.vae)
    assert stage1.profiler == "simple" and "profiler" not in vae
    assert vae.max_steps == 7 and stage1.max_steps == cfg.model.stages.video_stage1.trainer.get(
        "max_steps", cfg.trainer.max_steps)


def test_the_learning_benchmark_overrides_compose_and_reach_their_stages(tmp_path):
    """benchmarks/stage_b_learning.py's train.py overrides are valid config keys (a wrong one costs a GPU call)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stage_b_learning.py"
    spec = importlib.util.spec_from_file_location("stage_b_learning", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    args = benchmark.build_parser().parse_args([
        "train", "--dataset", "synthetic", "--work", str(tmp_path), "--out", str(tmp_path / "pack.tar.gz"),
        "--vae-patch", "128", "--channels-last", "--profile", "--cuda-graphs", "--distill-seconds", "60",
        "--stage2-sample-rate", "1"])
    cfg = _compose("train", benchmark._train_overrides(args, tmp_path), tmp_path)
    stages = cfg.model.stages
    assert stages.vae.train_patch_size == 128 and stages.vae.channels_last is True
    assert list(stages.video_stage1.loader.color_jitter) == [0.3, 0.3, 0.4, 0.08]
    assert list(stages.video_stage2.loader.color_jitter) == [0.3, 0.3, 0.4, 0.08]
    assert list(stages.video_stage2.loader.sample_rate) == [1]
    assert stages.vae.loader.color_jitter is None
    assert stages.video_stage1.performance.channels_last and stages.video_stage2.performance.channels_last
    assert stages.video_stage1.trainer.profiler == "simple" and stages.audio.enabled is False
    assert stages.video_stage1.performance.cuda_graphs and stages.video_stage2.performance.cuda_graphs
    datamodule = hydra.utils.instantiate(stages.video_stage1.loader, source=None)
    assert datamodule.frame_settings.color_jitter == (0.3, 0.3, 0.4, 0.08)
    # the evaluate phase: every variant's evaluate.py overrides compose, the schedule variant's included
    for variant, settings in benchmark.SCHEDULE_VARIANTS.items():
        evaluate = _compose("evaluate", benchmark._evaluate_overrides(args, tmp_path / "bundle", tmp_path, ["reference"],
                                                                     settings, tmp_path / variant), tmp_path)
        generation = evaluate.protocol.generation
        assert dict(generation.scheduler) == settings and list(generation.ablate) == ["reference"]
        assert evaluate.protocol.clips == 8 and generation.steps == 25
    distill = stages.video_distill
    assert distill.enabled and distill.trainer.max_time == "00:00:01:00" and distill.loader.batch_size == 4
    assert distill.optimizer.lr == 1e-4 and not distill.gradient_checkpointing
    assert not distill.performance.cuda_graphs  # the graphs capture stage 1 / 2's prediction only
    for variant, spec in benchmark.FAST_VARIANTS.items():  # issue 17's few-step and issue 16's deep-cache variants
        sampling = {key: spec[key] for key in benchmark.SAMPLING_KEYS if key in spec}
        evaluate = _compose("evaluate", benchmark._evaluate_overrides(
            args, tmp_path / "bundle", tmp_path, [], dict(spec.get("scheduler", {})), tmp_path / variant,
            **sampling), tmp_path)
        generation = evaluate.protocol.generation
        assert generation.steps == spec.get("steps", 25) and generation.distilled == spec.get("distilled", False)
        assert generation.deep_cache_interval == spec.get("deep_cache_interval", 1)
        assert generation.context_frames == spec.get("context_frames", 16)
        assert generation.guidance_scale == spec.get("guidance_scale")  # None: the bundle's
        assert dict(generation.scheduler) == spec.get("scheduler", {})
    assert benchmark.FAST_VARIANTS["guidance_1"]["guidance_scale"] == 1.0


def test_trainer_gpu_gives_the_measured_same_function_speed_settings(tmp_path):
    """trainer=gpu: cuDNN autotuning, and stage 1 channels-last where it measured faster (auto: CUDA at SD-1.5
    widths); fused AdamW comes from the module on CUDA (tests/training/test_video_performance.py)."""
    cfg = _compose("train", ["model=video_stage1", "backbone=sd15", "trainer=gpu"], tmp_path)
    assert cfg.trainer.benchmark is True and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.performance.channels_last == "auto" and cfg.model.performance.cuda_graphs == "auto"
    assert "fused" not in cfg.model.optimizer  # left to the module: fused on CUDA, unless set here
