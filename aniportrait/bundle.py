"""Checkpoint bundles: what training exports and inference loads (GUIDE section 4).

```
<bundle>/aniportrait.yaml        format version, components and their configs, stage settings (fps, size,
                                 pose handling, identities), base-model references, provenance
<bundle>/<component>.safetensors one file per component, in the OFFICIAL key layout
```
A bundle may hold stage A only, stage B only, or both. Writes are atomic (a temporary folder renamed
into place) and never replace what the user did not ask to replace: an existing bundle only with ``--force``
(``overwrite=True``), a folder of other files never, a folder holding an input (``OUT == DIR``) never.
Loading is strict: missing or unexpected keys are reported, never silently dropped.

Command line::

    python -m aniportrait.bundle export CKPT OUT [--force]            # a Lightning checkpoint of ours -> bundle
    python -m aniportrait.bundle import-official DIR OUT [--force]   # the official release files -> bundle
    python -m aniportrait.bundle info BUNDLE                # what a bundle holds

``import-official`` reads whichever of the official ``audio2mesh.pt``, ``audio2pose.pt``, ``reference_unet.pth``,
``denoising_unet.pth``, ``motion_module.pth`` and ``pose_guider.pth`` are in DIR, checks each strictly against
the official architecture (wav2vec2-base-960h audio models with latent 512, SD-1.5 UNets, the inference_v2
motion modules, the released PoseGuider), and writes a bundle with the official inference settings and
references to the base models (SD-1.5, sd-vae-ft-mse, the sd-image-variations image encoder; the wav2vec2
weights are inside the audio checkpoints). A component entry may also point at an official file in place
(``--link``) instead of a ``.safetensors`` copy.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpoints import load_state_dict_checked, read_checkpoint
from aniportrait.models.schedulers import INFERENCE_V2_SCHEDULER
from aniportrait.models.wav2vec2 import BASE_960H_CONFIG, upgrade_weight_norm_keys
from aniportrait.utils.atomic import atomic_dir
from aniportrait.utils.outputs import Overwrite, check_output_dir

__all__ = ["Bundle", "export_bundle", "import_official", "OfficialImport", "component_architecture", "load_vae",
           "official_settings", "load_component_weights", "BUNDLE_FILE", "FORMAT_VERSION", "OFFICIAL_FILES",
           "OFFICIAL_BASE_MODELS", "OFFICIAL_HUB_REPO", "git_sha"]

log = logging.getLogger(__name__)

BUNDLE_FILE = "aniportrait.yaml"
FORMAT_VERSION = 1
STAGE_A = ("audio2mesh", "audio2pose")
STAGE_B = ("reference_unet", "denoising_unet", "motion_module", "pose_guider")


def git_sha(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the code that produced a bundle (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _class_path(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _import_class(path: str):
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise AniPortraitError(f"bundle names class {path!r}, which this version of aniportrait lacks ({error})") from error


def _plain(value):
    """Config values as plain YAML types (tuples -> lists, numpy/torch scalars -> Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _write_component(folder: Path, name: str, module: torch.nn.Module, state: Mapping[str, torch.Tensor],
                     extra: Mapping[str, Any] | None = None) -> dict:
    """Save one component's weights as ``<name>.safetensors`` in ``folder``; returns its manifest entry."""
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}
    file_name = f"{name}.safetensors"
    save_file(tensors, str(folder / file_name), metadata={"component": name, "format": "aniportrait"})
    return _component_entry(file_name, module, len(tensors), extra)


def _module_config(module: torch.nn.Module) -> dict[str, Any]:
    """A ConfigMixin module's constructor arguments (diffusers' private ``_name_or_path`` etc. left out)."""
    return {k: v for k, v in dict(getattr(module, "config", {}) or {}).items() if not k.startswith("_")}


def _component_entry(file_name: str, module: torch.nn.Module, num_tensors: int,
                     extra: Mapping[str, Any] | None = None) -> dict:
    return {
        "file": file_name,
        "class": _class_path(module),
        "config": _plain(_module_config(module)),
        "num_tensors": num_tensors,
        **dict(extra or {}),
    }


def _write_manifest(folder: Path, entries: dict, settings: dict | None, base_models: dict | None,
                    provenance: dict | None) -> None:
    document = {
        "format": "aniportrait-bundle",
        "format_version": FORMAT_VERSION,
        "components": entries,
        "settings": _plain(settings or {}),
        "base_models": _plain(base_models or {}),
        "provenance": _plain({
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(),
            **(provenance or {}),
        }),
    }
    (folder / BUNDLE_FILE).write_text(yaml.safe_dump(document, sort_keys=False))


def export_bundle(
    out_dir: str | os.PathLike,
    components: dict[str, torch.nn.Module],
    settings: dict | None = None,
    base_models: dict | None = None,
    provenance: dict | None = None,
    state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle. ``components`` maps a component name to a ConfigMixin model whose state dict is
    in the official layout; ``state_dicts`` may override what is saved for a component (e.g. only the
    motion-module keys of a UNet3D for ``motion_module``). An existing bundle at ``out_dir`` is replaced only
    with ``overwrite=True``; a non-empty folder that is not a bundle never."""
    out_dir = check_output_dir(out_dir, {}, Overwrite(overwrite, "overwrite=True"), "bundle", BUNDLE_FILE)
    state_dicts = state_dicts or {}
    with atomic_dir(out_dir, replace=out_dir.exists()) as tmp:
        entries = {name: _write_component(tmp, name, module, state_dicts.get(name) or module.state_dict())
                   for name, module in components.items()}
        _write_manifest(tmp, entries, settings, base_models, provenance)
    return out_dir


@dataclass
class Bundle:
    """A bundle on disk; ``load(name)`` builds a component with its weights."""

    path: Path
    document: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> Bundle:
        path = Path(path)
        if not path.exists():
            raise AniPortraitError(f"bundle not found: {path}; give the folder a training run printed as `bundle: <path>`")
        if path.is_file():
            raise AniPortraitError(f"{path} is a file; a bundle is a folder with {BUNDLE_FILE} (for official .pt/.pth "
                                   "files use `python -m aniportrait.bundle import-official DIR OUT`)")
        manifest = path / BUNDLE_FILE
        if not manifest.is_file():
            raise AniPortraitError(f"{path} is not a bundle: it has no {BUNDLE_FILE}")
        try:
            document = yaml.safe_load(manifest.read_text())
        except yaml.YAMLError as error:
            raise AniPortraitError(f"{manifest} is not valid YAML ({error})") from error
        if not isinstance(document, dict) or document.get("format") != "aniportrait-bundle":
            raise AniPortraitError(f"{manifest} is not an aniportrait bundle manifest")
        if int(document.get("format_version", 0)) > FORMAT_VERSION:
            raise AniPortraitError(f"{path} has bundle format {document['format_version']}; this aniportrait reads up to "
                                   f"{FORMAT_VERSION}: upgrade aniportrait")
        return cls(path=path, document=document)

    @property
    def components(self) -> dict:
        return self.document.get("components", {})

    @property
    def settings(self) -> dict:
        return self.document.get("settings", {})

    @property
    def base_models(self) -> dict:
        return self.document.get("base_models", {})

    def has(self, *names: str) -> bool:
        return all(name in self.components for name in names)

    def require(self, *names: str, purpose: str = "this mode") -> None:
        missing = [name for name in names if name not in self.components]
        if missing:
            present = ", ".join(self.components) or "nothing"
            raise AniPortraitError(
                f"bundle {self.path} has no {', '.join(missing)} (it holds {present}); {purpose} needs it: "
                "export a bundle from a run that trained it"
            )

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Component weights: the bundle's ``.safetensors``, or an official ``.pt/.pth`` it links to."""
        self.require(name)
        file_path = self.path / self.components[name]["file"]  # an absolute ``file`` (a linked release file) stays
        if not file_path.is_file():
            raise AniPortraitError(f"bundle {self.path} lists {name} but {file_path} is missing")
        return upgrade_weight_norm_keys(read_checkpoint(file_path))

    def load(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Instantiate component ``name`` from its config and load its weights strictly (eval mode)."""
        self.require(name)
        entry = self.components[name]
        cls = _import_class(entry["class"])
        module = cls(**entry.get("config", {}))
        load_state_dict_checked(module, self.state_dict(name), f"{name} ({self.path})")
        module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
        return module.eval()


def load_component_weights(module: torch.nn.Module, source: str | os.PathLike, component: str,
                           allow_missing: Iterable[str] = ()) -> None:
    """Load ``component`` weights into ``module`` from a bundle folder or a single weights file (our
    .safetensors, or an official .pt/.pth). Used for fine-tuning and the official release files."""
    source = Path(source)
    if source.is_dir():
        state = Bundle.open(source).state_dict(component)
    else:
        state = read_checkpoint(source)
    state = upgrade_weight_norm_keys(state)  # release files saved with torch<2.1 use weight_g / weight_v
    load_state_dict_checked(module, state, f"{component} ({source})", allow_missing=tuple(allow_missing))


def load_vae(source: str | os.PathLike, key: str) -> torch.nn.Module:
    """A trained AutoencoderKL: a bundle folder with a ``vae`` component (what ``model=vae`` exports) or a diffusers
    AutoencoderKL folder (config.json + weights); ``key`` names the setting in errors (e.g. backbone.video.vae)."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if (path / BUNDLE_FILE).is_file():
        bundle = Bundle.open(path)
        bundle.require("vae", purpose=f"{key}={source}")
        return bundle.load("vae")
    weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    if (path / "config.json").is_file() and any((path / name).is_file() for name in weights):
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()
    raise AniPortraitError(
        f"{key}={source!r}: expected a bundle folder with a vae component (the `bundle: ...` a model=vae run prints) "
        f"or an AutoencoderKL folder (config.json and {' or '.join(weights)}); train one with "
        "`python train.py model=vae backbone=...`"
    )


# -- the official release -----------------------------------------------------------------------------------

OFFICIAL_HUB_REPO = "ZJYang/AniPortrait"
# component -> file name in the release (huggingface.co/ZJYang/AniPortrait)
OFFICIAL_FILES: dict[str, str] = {
    "audio2mesh": "audio2mesh.pt",
    "audio2pose": "audio2pose.pt",
    "reference_unet": "reference_unet.pth",
    "denoising_unet": "denoising_unet.pth",
    "motion_module": "motion_module.pth",
    "pose_guider": "pose_guider.pth",
}
# base_models.video of an official bundle: hub ids, downloaded and cached by diffusers / transformers on first use
OFFICIAL_BASE_MODELS: dict[str, Any] = {
    "kind": "sd15",
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "vae": "stabilityai/sd-vae-ft-mse",
    "image_encoder": "lambdalabs/sd-image-variations-diffusers",
    "image_encoder_subfolder": "image_encoder",
}
OFFICIAL_WAV2VEC2 = "facebook/wav2vec2-base-960h (architecture; the weights are inside audio2mesh.pt / audio2pose.pt)"
# runwayml/stable-diffusion-v1-5 unet/config.json: the architecture of both released UNets
OFFICIAL_SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}


def official_settings(stage_a: bool, stage_b: bool) -> dict[str, Any]:
    """What the official scripts do at inference, as bundle settings."""
    settings: dict[str, Any] = {}
    if stage_a:
        settings["audio"] = {
            "fps": 30.0,
            "sample_rate": 16000,
            "pose": {
                "rotation_scale": 0.5,  # audio2vid.py halves the predicted rotations
                "smooth_window": 7,  # and smooths the poses over 7 frames
                "chunk_frames": 150,  # Audio2Pose decodes 5 s chunks at 30 fps ...
                "context_frames": 10,  # ... here each continuing from the previous one's last frames
                "identities": {},
                "default_identity": 0,
            },
        }
    if stage_b:
        settings["video"] = {
            "stage": 2,
            "width": 512,
            "height": 512,
            "fps": 30.0,
            "pose_scaling": "official_inference",  # see aniportrait.models.pose_image_scaling
            "sampling": "official",  # the official pipeline's frames (aniportrait.pipelines.presets)
            "scheduler": dict(INFERENCE_V2_SCHEDULER),
            "num_inference_steps": 25,
            "guidance_scale": 3.5,
            "context_frames": 16,
            "context_overlap": 4,
            "weights": "official release",
        }
    return settings


def _official_architecture(name: str) -> tuple[type, dict[str, Any]]:
    """(class, constructor arguments) of one released component."""
    from aniportrait.models.audio2mesh import Audio2Mesh
    from aniportrait.models.audio2pose import Audio2Pose
    from aniportrait.models.pose_guider import PoseGuider
    from aniportrait.models.reference_unet import ReferenceNet
    from aniportrait.models.unet3d import UNet3DConditionModel

    wav2vec2 = {k: v for k, v in json.loads(BASE_960H_CONFIG.read_text()).items() if not k.startswith("_")}
    if name in ("audio2mesh", "audio2pose"):
        return (Audio2Mesh if name == "audio2mesh" else Audio2Pose), {"wav2vec2_config": wav2vec2, "latent_dim": 512}
    if name == "reference_unet":
        return ReferenceNet, dict(OFFICIAL_SD15_UNET_CONFIG)
    if name == "pose_guider":
        return PoseGuider, {}
    with torch.device("meta"):  # UNet3D's own config of the SD-1.5 UNet with inference_v2's motion modules
        unet = UNet3DConditionModel.from_unet2d_config(OFFICIAL_SD15_UNET_CONFIG,
                                                       use_motion_module=name == "motion_module")
    return UNet3DConditionModel, _module_config(unet)


Architecture = Mapping[str, tuple[type, dict[str, Any]]]  # component -> (class, constructor arguments)


def _architecture_table(architecture: Bundle | Mapping[str, torch.nn.Module] | None) -> Architecture:
    """(class, config) per component of a bundle's entries, or of modules."""
    if architecture is None:
        return {}
    if isinstance(architecture, Mapping):
        return {name: (type(module), _module_config(module)) for name, module in architecture.items()}
    return {name: (_import_class(entry["class"]), dict(entry.get("config", {})))
            for name, entry in architecture.components.items()}


def component_architecture(name: str, architecture: Architecture | None = None) -> torch.nn.Module:
    """An empty (meta-device) module of component ``name``: the given class and config, else the official ones.
    Only keys and shapes matter here, so nothing is allocated."""
    cls, config = (architecture or {}).get(name) or _official_architecture(name)
    config = dict(config)
    if name in ("denoising_unet", "motion_module"):  # the 2-D part alone, or the whole UNet3D with motion modules
        config["use_motion_module"] = name == "motion_module"
    with torch.device("meta"):
        return cls(**config)


def _check_official_state(name: str, module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict key and shape check (raises naming the file and listing the keys); loads nothing."""
    from aniportrait.models.unet3d import MOTION_MODULE_KEYS

    # motion_module.pth holds only the motion-module keys of the UNet3D; every other file is the whole module
    allow_missing = (rf"(?!{MOTION_MODULE_KEYS})",) if name == "motion_module" else ()
    with warnings.catch_warnings():  # copying into meta tensors is a no-op that torch warns about
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        load_state_dict_checked(module, state, f"{name} ({source})", allow_missing=allow_missing)


@dataclass(frozen=True)
class OfficialImport:
    """What :func:`import_official` found and wrote."""

    path: Path
    found: dict[str, Path]  # component -> release file
    missing: tuple[str, ...]  # components whose file was not in the folder


def import_official(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_models: Mapping[str, Any] | None = None,
    architecture: str | os.PathLike | Bundle | Mapping[str, torch.nn.Module] | None = None,
    link: bool = False,
    overwrite: bool = False,
) -> OfficialImport:
    """Build a bundle from official release files in ``source_dir`` (any subset of :data:`OFFICIAL_FILES`).

    Every file is read with ``torch.load(weights_only=True)``, its wav2vec2 weight-norm keys upgraded (both
    spellings load), and checked strictly against the component's architecture: a file of another
    architecture raises :class:`AniPortraitError` listing the missing, unexpected and mis-shaped keys.

    base_models: ``base_models.video`` of the bundle (default: the architecture bundle's, else
    :data:`OFFICIAL_BASE_MODELS`, hub ids; give local directories on offline machines). architecture: a bundle, or
    modules by component name, whose classes and configs to use instead of the official ones (fine-tuned variants,
    tiny test weights); components it does not name keep the official architecture. link: point the bundle at the
    release files in place instead of writing ``.safetensors`` copies (no second copy of ~10 GB; they must stay put).
    overwrite: replace an existing bundle at ``out_dir`` (never a folder holding the release files or other files).
    """
    source_dir, out_dir = Path(source_dir).expanduser(), Path(out_dir).expanduser()
    if not source_dir.is_dir():
        raise AniPortraitError(f"{source_dir} is not a folder; give the folder holding the official release files "
                               f"({', '.join(OFFICIAL_FILES.values())})")
    found = {name: source_dir / file for name, file in OFFICIAL_FILES.items() if (source_dir / file).is_file()}
    missing = tuple(name for name in OFFICIAL_FILES if name not in found)
    if not found:
        raise AniPortraitError(f"{source_dir} holds none of the official release files ({', '.join(OFFICIAL_FILES.values())}); "
                               f"download them from huggingface.co/{OFFICIAL_HUB_REPO}")
    if found.keys() & {"reference_unet", "denoising_unet", "pose_guider", "motion_module"} and not (
            found.keys() >= {"reference_unet", "denoising_unet", "pose_guider"}):
        log.warning("%s: stage B needs reference_unet.pth, denoising_unet.pth and pose_guider.pth together; "
                    "video generation will refuse this bundle", source_dir)
    inputs = {"DIR": source_dir, **{f"DIR/{file.name}": file.resolve() for file in found.values()}}
    if isinstance(architecture, (str, os.PathLike)):
        inputs["--architecture-from"] = Path(architecture)
    out_dir = check_output_dir(out_dir, inputs, Overwrite(overwrite, "--force"), "bundle", BUNDLE_FILE)
    if architecture is not None and not isinstance(architecture, (Bundle, Mapping)):
        architecture = Bundle.open(architecture)
    table = _architecture_table(architecture)
    entries = {}
    with atomic_dir(out_dir, replace=out_dir.exists()) as tmp:
        for name, file in found.items():
            state = upgrade_weight_norm_keys(read_checkpoint(file))
            module = component_architecture(name, table)
            _check_official_state(name, module, state, file)
            if link:
                entries[name] = _component_entry(str(file.resolve()), module, len(state), {"source": str(file.resolve())})
            else:
                entries[name] = _write_component(tmp, name, module, state, {"source": str(file.resolve())})
            del state
        stage_a = bool(found.keys() & set(STAGE_A))
        stage_b = bool(found.keys() & set(STAGE_B))
        bases: dict[str, Any] = {}
        if stage_a:
            bases["wav2vec2"] = OFFICIAL_WAV2VEC2
        if stage_b:
            template_bases = architecture.base_models.get("video") if isinstance(architecture, Bundle) else None
            bases["video"] = dict(base_models or template_bases or OFFICIAL_BASE_MODELS)
        _write_manifest(tmp, entries, official_settings(stage_a, stage_b), bases,
                        {"source": f"official AniPortrait release (huggingface.co/{OFFICIAL_HUB_REPO})",
                         "release_dir": str(source_dir.resolve()), "linked": link})
    return OfficialImport(out_dir, found, missing)


if __name__ == "__main__":  # the command line lives with the other entry points, above every library module
    from aniportrait.cli import bundle as bundle_command

    sys.exit(bundle_command())
