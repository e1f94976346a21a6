"""Checkpoint bundles: what training exports and inference loads (GUIDE section 4).

```
<bundle>/aniportrait.yaml        format version, components and their configs, stage settings (fps, size,
                                 pose handling, identities), base-model references, provenance
<bundle>/<component>.safetensors one file per component, in the OFFICIAL key layout
```
A bundle may hold stage A only, stage B only, or both. Writes are atomic (a temporary folder renamed
into place). Loading is strict: missing or unexpected keys are reported, never silently dropped.

Command line::

    python -m aniportrait.bundle export CKPT OUT     # any Lightning checkpoint of ours -> bundle
    python -m aniportrait.bundle info BUNDLE         # what a bundle holds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpoints import load_state_dict_checked, read_checkpoint
from aniportrait.models.wav2vec2 import upgrade_weight_norm_keys
from aniportrait.utils.atomic import atomic_dir

__all__ = ["Bundle", "export_bundle", "BUNDLE_FILE", "FORMAT_VERSION", "git_sha"]

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


def export_bundle(
    out_dir: str | os.PathLike,
    components: dict[str, torch.nn.Module],
    settings: dict | None = None,
    base_models: dict | None = None,
    provenance: dict | None = None,
    state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a bundle. ``components`` maps a component name to a ConfigMixin model whose state dict is
    in the official layout; ``state_dicts`` may override what is saved for a component (e.g. only the
    motion-module keys of a UNet3D for ``motion_module``)."""
    out_dir = Path(out_dir)
    state_dicts = state_dicts or {}
    entries = {}
    with atomic_dir(out_dir) as tmp:
        for name, module in components.items():
            state = state_dicts.get(name) or module.state_dict()
            tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}
            file_name = f"{name}.safetensors"
            save_file(tensors, str(tmp / file_name), metadata={"component": name, "format": "aniportrait"})
            config = dict(getattr(module, "config", {}) or {})
            entries[name] = {
                "file": file_name,
                "class": _class_path(module),
                "config": _plain({k: v for k, v in config.items() if not k.startswith("_")}),
                "num_tensors": len(tensors),
            }
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
        (tmp / BUNDLE_FILE).write_text(yaml.safe_dump(document, sort_keys=False))
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
        self.require(name)
        file_path = self.path / self.components[name]["file"]
        if not file_path.is_file():
            raise AniPortraitError(f"bundle {self.path} lists {name} but {file_path.name} is missing")
        return load_file(str(file_path))

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


def _export_from_checkpoint(checkpoint_path: Path, out_dir: Path) -> Path:
    from aniportrait.training.export import export_from_lightning_checkpoint

    return export_from_lightning_checkpoint(checkpoint_path, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aniportrait.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="Lightning checkpoint -> bundle")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    info = commands.add_parser("info", help="print what a bundle holds")
    info.add_argument("bundle", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            path = _export_from_checkpoint(args.checkpoint, args.out)
            print(f"bundle: {path}")
        elif args.command == "info":
            bundle = Bundle.open(args.bundle)
            print(yaml.safe_dump({k: v for k, v in bundle.document.items() if k != "components"}, sort_keys=False))
            for name, entry in bundle.components.items():
                print(f"{name}: {entry['class']} ({entry.get('num_tensors', '?')} tensors)")
    except AniPortraitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
