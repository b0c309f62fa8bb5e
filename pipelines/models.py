"""Model sources: a MONAI bundle directory or a TorchScript file, checked and loaded once.

A bundle is `configs/metadata.json`, `configs/inference.json` (with `network_def`, and
usually `preprocessing`, `inferer` and `postprocessing`) and `models/model.ts` or
`models/model.pt`. A bare `.pt` state dict needs its network from config (`network:`); any
other file is TorchScript. Nothing is ever downloaded: a model is where the config says, or
the pipeline is unavailable with a message saying what is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pipelines
from pipelines.base import Unavailable

if TYPE_CHECKING:  # checking a source (status, the HTTP server) imports neither
    import torch
    from monai.bundle import ConfigParser

BUNDLE_CONFIGS = ("configs/metadata.json", "configs/inference.json")
BUNDLE_WEIGHTS = ("models/model.ts", "models/model.pt")
STATE_DICT_SUFFIXES = (".pt", ".pth")

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
            if weights.suffix not in STATE_DICT_SUFFIXES:
                network = torch.jit.load(str(weights), map_location=device)
            else:
                definition = parser or _parser({"network_def": self.network})
                network = definition.get_parsed_content("network_def", instantiate=True)
                network.load_state_dict(_state_dict(weights, device))
        except Exception as exc:
            raise Unavailable(f"cannot load {weights}: {exc}") from exc
        return LoadedModel(network.to(device).eval(), device, parser)


def _parser(config: dict[str, Any] | None = None) -> ConfigParser:
    """A MONAI config parser whose expressions can also name our modules (`pipelines.`)."""
    from monai.bundle import ConfigParser

    return ConfigParser(config, globals={"pipelines": pipelines})


def _state_dict(weights: Path, device: torch.device) -> dict[str, torch.Tensor]:
    import torch

    state = torch.load(weights, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state
