"""model.performance switches compute the same function as the plain path (issue 8): channels-last weights and
torch.compile (aot_eager on CPU: the same graph capture and autograd as inductor, without code generation)."""

import pytest
import torch

from aniportrait.training.video import VideoStage1Module

pytestmark = pytest.mark.filterwarnings("ignore")


def _batch(batch=4, size=128, clip=32):
    # 128 px: at 64 px the tiny PoseGuider's last BatchNorm sees 1x1 maps, whose batch statistics make gradients
    # chaotic (any rounding change moves them); at 128 px the comparison is well conditioned.
    generator = torch.Generator().manual_seed(0)
    image = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    return {"pixel_values": image(batch, 1, 3, size, size), "pose_images": image(batch, 1, 3, size, size),
            "reference_image": image(batch, 3, size, size), "reference_pose": image(batch, 3, size, size),
            "clip_image": torch.randn(batch, 3, clip, clip, generator=generator), "sample_index": torch.arange(batch)}


def _loss_and_gradients(performance):
    torch.manual_seed(0)
    module = VideoStage1Module({"kind": "tiny", "seed": 0}, loss={"uncond_ratio": 0.0}, performance=performance)
    module.setup("fit")
    loss = module._diffusion_loss(_batch(), stream=0, allow_uncond=False)
    loss.backward()
    module.reference_control.clear()
    return loss.detach(), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


def _relative(gradients, reference):
    num = sum(((gradients[k] - reference[k]) ** 2).sum() for k in reference)
    return float((num / sum((g**2).sum() for g in reference.values())).sqrt())


@pytest.fixture(scope="module")
def plain():
    return _loss_and_gradients(None)


@pytest.mark.parametrize("performance,tolerance", [
    ({"channels_last": True}, 1e-4),
    pytest.param({"compile": {"backend": "aot_eager", "dynamic": False}}, 1e-6, marks=pytest.mark.slow,
                 id="compile"),  # a minute of tracing on 2 cores: pytest -m slow
])
def test_performance_switch_computes_the_same_step(plain, performance, tolerance):
    loss, gradients = _loss_and_gradients(performance)
    torch.testing.assert_close(loss, plain[0], rtol=1e-5, atol=1e-7)
    assert gradients.keys() == plain[1].keys()
    assert _relative(gradients, plain[1]) < tolerance


def test_cuda_graphs_refuse_what_a_captured_step_cannot_do():
    from aniportrait.errors import AniPortraitError
    from aniportrait.training.graphed import use_cuda_graphs

    module = VideoStage1Module({"kind": "tiny", "seed": 0}, performance={"cuda_graphs": True})
    with pytest.raises(AniPortraitError, match=r"cuda_graphs=true .*CUDA device .*trainer=gpu"):
        module.setup("fit")  # on the CPU
    settings = {"device_type": "cuda", "strategy": "SingleDeviceStrategy", "compile_options": None,
                "accumulate_grad_batches": 1, "gradient_checkpointing": False, "uncond_per_sample": False}
    assert use_cuda_graphs(True, **settings) and use_cuda_graphs("auto", **settings)  # what it can do is used
    assert not use_cuda_graphs(False, **settings)
    for key, value, named in (("device_type", "cpu", "trainer=gpu"), ("strategy", "DDPStrategy", "trainer.devices=1"),
                              ("compile_options", {}, "model.performance.compile"),
                              ("accumulate_grad_batches", 4, "trainer.accumulate_grad_batches=4"),
                              ("random_modules", ["Dropout(p=0.1)"], "model.gradient_checkpointing"),
                              ("uncond_per_sample", True, "model.loss.uncond_per_sample")):
        with pytest.raises(AniPortraitError, match=named.replace(".", r"\.")):
            use_cuda_graphs(True, **{**settings, key: value, "gradient_checkpointing": key == "random_modules"})
        assert not use_cuda_graphs("auto", **{**settings, key: value, "gradient_checkpointing": key == "random_modules"})
    # checkpointing is captured (its recomputation is part of the backward graph) unless it would replay dropout
    assert use_cuda_graphs(True, **{**settings, "gradient_checkpointing": True})
    assert use_cuda_graphs("auto", **{**settings, "gradient_checkpointing": True, "random_modules": []})
    assert use_cuda_graphs("auto", **{**settings, "random_modules": ["Dropout(p=0.1)"]})  # no recomputation: fine
    with pytest.raises(AniPortraitError, match="cuda_graphs='yes': expected true, false or auto"):
        use_cuda_graphs("yes", **settings)


def test_cuda_graphs_auto_is_the_default_and_eager_on_the_cpu():
    module = VideoStage1Module({"kind": "tiny", "seed": 0})
    assert module.performance["cuda_graphs"] == "auto"
    module.setup("fit")
    assert module._graphed_prediction is None  # the CPU: nothing captured


def test_captured_module_with_checkpointing_keeps_the_bank_and_the_gradients():
    """What the graphs capture with checkpointing on, run eagerly on the CPU: ConditionalPrediction keeps the
    reference bank for the backward (the recomputed attention reads it again) and checkpointing without the RNG state
    gives the gradients of diffusers' default checkpointing (no layer draws random numbers)."""
    from aniportrait.models.checkpointing import (
        checkpoint_without_rng_state,
        random_modules,
        set_checkpoint_function,
    )
    from aniportrait.training.graphed import ConditionalPrediction

    def gradients(checkpointing, function=None):
        torch.manual_seed(0)
        module = VideoStage1Module({"kind": "tiny", "seed": 0}, gradient_checkpointing=checkpointing)
        module.setup("fit")
        module.train()
        if function is not None:
            for unet in (module.reference_unet, module.denoising_unet):
                set_checkpoint_function(unet, function)
        # the step's graphed path, with the module the graphs would capture run as it is
        module._graphed_prediction = ConditionalPrediction(module.pose_guider, module.reference_unet,
                                                           module.denoising_unet, module.reference_control)
        assert module._graphed_prediction.recomputes is bool(checkpointing)
        assert random_modules(module.reference_unet, module.denoising_unet) == []
        loss = module._diffusion_loss(_batch(), stream=0, allow_uncond=False)
        assert bool(module.reference_control.bank) is bool(checkpointing)  # kept for the recomputation
        loss.backward()
        module.reference_control.clear()
        return loss.detach(), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}

    plain_loss, plain = gradients(False)
    for checkpointing in (True, [0]):
        loss, checkpointed = gradients(checkpointing, checkpoint_without_rng_state)
        torch.testing.assert_close(loss, plain_loss)
        assert checkpointed.keys() == plain.keys()
        assert _relative(checkpointed, plain) < 1e-5


def test_random_modules_finds_dropout():
    from torch import nn

    from aniportrait.models.checkpointing import random_modules

    assert random_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) == []
    assert random_modules(nn.Sequential(nn.Dropout(0.1)), nn.Dropout2d(0.5)) == ["Dropout(p=0.1)", "Dropout2d(p=0.5)"]


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True, [0]], ids=["plain", "checkpointing", "levels0"])
def test_cuda_graphs_compute_the_eager_step(monkeypatch, checkpointing):
    """Two steps on one batch, eager and replayed from the graphs: the same losses, gradients and BatchNorm
    statistics (the capture's warm-up passes must not move them). Full fp32 and deterministic kernels: with cuDNN's
    default TF32 convolutions the two runs may pick different algorithms, and the gradients then differ by ~5e-4
    (measured on an H200) from rounding alone, which would hide a real difference of that size."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 matmuls either
    try:
        _compare_graphed_with_eager(checkpointing)
    finally:
        torch.set_float32_matmul_precision(precision)


def _compare_graphed_with_eager(checkpointing):

    def steps(cuda_graphs):
        torch.manual_seed(0)
        module = VideoStage1Module({"kind": "tiny", "seed": 0}, loss={"uncond_ratio": 0.0},
                                   gradient_checkpointing=checkpointing,
                                   performance={"cuda_graphs": cuda_graphs}).cuda()
        module.setup("fit")
        module.train()
        batch = {key: value.cuda() for key, value in _batch().items()}
        results = []
        for _ in range(2):
            loss = module._diffusion_loss(batch, stream=0, allow_uncond=False)
            loss.backward()
            module.reference_control.clear()
            results.append((loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()
                                            if p.grad is not None}))
            module.zero_grad(set_to_none=True)
        buffers = {name: buffer.clone() for name, buffer in module.pose_guider.named_buffers()}
        return results, buffers, module

    eager, eager_buffers, _ = steps(False)
    graphed, graphed_buffers, module = steps(True)
    assert module._graphed_prediction.replays == 2
    for (loss, gradients), (reference_loss, reference_gradients) in zip(graphed, eager):
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
        assert gradients.keys() == reference_gradients.keys()
        assert _relative(gradients, reference_gradients) < 1e-4
    for name, buffer in eager_buffers.items():
        torch.testing.assert_close(graphed_buffers[name], buffer)


def test_the_capture_ignores_other_threads_cuda_calls(monkeypatch):
    """The graphs are captured in thread_local mode: the loader's pin-memory thread allocating page-locked memory
    during the capture must not invalidate it (it did, in global mode, on an H200)."""
    from aniportrait.training import graphed

    module = VideoStage1Module({"kind": "tiny", "seed": 0})
    seen = {}

    def fake_make_graphed_callables(callable_, samples, num_warmup_iters=3, allow_unused_input=False, pool=None,
                                    capture_error_mode="global"):  # torch's signature
        seen.update(allow_unused_input=allow_unused_input, capture_error_mode=capture_error_mode)
        return callable_

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    prediction = graphed.GraphedPrediction(module.pose_guider, module.reference_unet, module.denoising_unet,
                                           module.reference_control, autocast_dtype=None)
    prediction._capture((torch.zeros(1),))
    assert seen["capture_error_mode"] == "thread_local" and seen["allow_unused_input"] is True


def test_channels_last_auto_is_on_for_sd15_on_cuda_only():
    """model.performance.channels_last=auto (stage 1's default): NHWC where it measured faster (SD-1.5 widths on
    CUDA), not at backbone=small's widths (slower there) nor on the CPU; explicit values pass; typos are refused."""
    from aniportrait.errors import AniPortraitError
    from aniportrait.training.video import resolve_channels_last

    assert resolve_channels_last("auto", "cuda", "sd15") is True
    assert resolve_channels_last("auto", "cuda", "small") is False
    assert resolve_channels_last("auto", "cpu", "sd15") is False
    assert resolve_channels_last(True, "cpu", "tiny") is True and resolve_channels_last(False, "cuda", "sd15") is False
    with pytest.raises(AniPortraitError, match="channels_last='yes'"):
        resolve_channels_last("yes", "cuda", "sd15")


def test_adamw_is_fused_on_cuda_unless_the_config_chooses():
    from aniportrait.training.video import auto_fused_adamw

    adamw = {"_target_": "torch.optim.AdamW", "lr": 1e-5}
    assert auto_fused_adamw(adamw, "cuda", "SingleDeviceStrategy") and auto_fused_adamw(adamw, "cuda", "DDPStrategy")
    assert auto_fused_adamw(adamw, "cuda", None)  # a module stepped by hand
    assert not auto_fused_adamw(adamw, "cpu", "SingleDeviceStrategy")
    assert not auto_fused_adamw(adamw, "cuda", "DeepSpeedStrategy") and not auto_fused_adamw(adamw, "cuda", "FSDPStrategy")
    assert not auto_fused_adamw({**adamw, "fused": False}, "cuda", None)
    assert not auto_fused_adamw({**adamw, "foreach": True}, "cuda", None)
    assert not auto_fused_adamw({"_target_": "torch.optim.SGD", "lr": 1.0}, "cuda", None)
    assert auto_fused_adamw(adamw, "cuda", None, "bf16-mixed")
    assert not auto_fused_adamw(adamw, "cuda", None, "16-mixed")  # it would unscale inside; Lightning clips before


def test_the_plain_module_keeps_nchw_and_the_multi_tensor_adamw_on_the_cpu():
    """On the CPU the auto settings resolve to the plain path (what every CPU test measures)."""
    module = VideoStage1Module({"kind": "tiny", "seed": 0}, performance={"channels_last": "auto"})
    module._apply_performance_settings()
    assert module.performance["channels_last"] is False
    assert module.denoising_unet.conv_in.weight.is_contiguous()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert not optimizer.defaults.get("fused")


def test_compiled_vae_encoder_draws_the_same_latents(monkeypatch):
    """model.performance.compile_vae_encoder: the step encodes through a compiled channels-last copy of the frozen
    VAE's encoder (dynamo's eager backend here: the same graph capture without code generation), with the latents
    of vae.encode; the frozen VAE itself stays NCHW (its eager encoder is slower in NHWC) and is compiled once."""
    import aniportrait.training.video as video

    compiled = []
    real_compile = torch.compile

    def compile_eager(module, **options):
        compiled.append(module)
        return real_compile(module, backend="eager", **options)

    monkeypatch.setattr(video.torch, "compile", compile_eager)
    images = _batch()["pixel_values"].flatten(0, 1)
    latents = {}
    for setting in (False, True):
        module = VideoStage1Module({"kind": "tiny", "seed": 0},
                                   performance={"channels_last": True, "compile_vae_encoder": setting})
        module._apply_performance_settings()
        assert module.performance["compile_vae_encoder"] is setting
        assert module.frozen.vae.encoder.conv_in.weight.is_contiguous()
        assert module.denoising_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        draws = [module._sample_latents(images, module._generators({"sample_index": torch.arange(4)}, 0)[0])
                 for _ in range(2)]
        latents[setting] = draws[0]
        torch.testing.assert_close(draws[0], draws[1])
    assert len(compiled) == 1  # made once, kept for the next step
    torch.testing.assert_close(latents[True], latents[False], rtol=1e-5, atol=1e-5)


def test_compile_vae_encoder_auto_is_on_for_cuda_only():
    from aniportrait.errors import AniPortraitError
    from aniportrait.training.video import resolve_compile_vae_encoder

    assert resolve_compile_vae_encoder("auto", "cuda") is True and resolve_compile_vae_encoder("auto", "cpu") is False
    assert resolve_compile_vae_encoder(True, "cpu") is True and resolve_compile_vae_encoder(False, "cuda") is False
    with pytest.raises(AniPortraitError, match="compile_vae_encoder='on'"):
        resolve_compile_vae_encoder("on", "cuda")
