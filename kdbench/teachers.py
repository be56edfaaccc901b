"""Ways to obtain a trained teacher (``kdbench.teachers`` plugins).

A teacher source has a ``fingerprint()`` (part of the teacher's id, so a changed checkpoint
is a different teacher) and ``obtain(model, train)`` which leaves trained weights in
``model``: ``train`` is the engine's recipe trainer, ``train(model) -> metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdbench.artifacts import sha256_file
from kdbench.errors import ConfigError


class TrainByRecipe:
    """Train the teacher from scratch with the grid's ``teacher_train`` recipe (the default)."""

    def __init__(self) -> None:
        pass

    def fingerprint(self) -> dict[str, Any]:
        return {"source": "recipe"}

    def obtain(self, model: nn.Module, train: Callable[[nn.Module], dict]) -> dict:
        return train(model)


class LoadCheckpoint:
    """Load a teacher's weights from a local file (a state dict, or ``{"model": state_dict}``).

    ``sha256`` pins the file: a mismatch is an error. The file's hash is always part of the
    teacher id, so results never mix two different checkpoints.
    """

    def __init__(self, path: str, sha256: str | None = None, strict: bool = True):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"teacher checkpoint {str(self.path)!r} does not exist")
        self.sha256 = sha256_file(self.path)
        if sha256 is not None and sha256.lower() != self.sha256:
            raise ConfigError(
                f"teacher checkpoint {str(self.path)!r} has sha256 {self.sha256}, "
                f"but the grid pins {sha256}; point at the right file or update the hash"
            )
        self.strict = strict

    def fingerprint(self) -> dict[str, Any]:
        return {"source": "checkpoint", "sha256": self.sha256}

    def obtain(self, model: nn.Module, train: Callable[[nn.Module], dict]) -> dict:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            model.load_state_dict(state, strict=self.strict)
        except RuntimeError as e:
            raise ConfigError(f"teacher checkpoint {str(self.path)!r} does not fit the model: {e}") from None
        return {"checkpoint": str(self.path), "sha256": self.sha256}


class AsLoaded:
    """Use the teacher exactly as its model plugin built it (e.g. ``hf:/dir`` or
    ``torchvision`` with a local ``weights`` file): no training, no further loading."""

    def __init__(self) -> None:
        pass

    def fingerprint(self) -> dict[str, Any]:
        # the weights' location is part of the model's own parameters, hence of the teacher id
        return {"source": "loaded"}

    def obtain(self, model: nn.Module, train: Callable[[nn.Module], dict]) -> dict:
        return {}
