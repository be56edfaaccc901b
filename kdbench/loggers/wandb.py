"""Weights & Biases: a run per cell, offline unless the grid says ``mode: online``.

The grid's keys are ``wandb.init``'s own parameters (``project``, ``entity``, ``mode``, ``dir``,
``tags``, ``notes``, ``settings``, ...). Defaults: ``mode: offline`` (nothing leaves the machine;
``wandb sync <cell dir>/wandb/offline-run-*`` uploads later), ``dir`` the cell's directory,
``project`` and ``group`` the grid's name, ``name`` the cell's one-line description, ``tags``
method / pair / dataset / seed / cell id (the grid's tags are added), ``config`` the cell's config
with its ``cell_id`` (the grid's config keys are added). Per-epoch scalars are plotted against
their stage's epoch (``train/epoch``); the final metrics are the run's summary, the cell's files
copies in the run's ``files/``.
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdbench.errors import PluginError
from kdbench.loggers.base import Logger, RunInfo, missing_library

#: ``wandb.init`` keys kdbench sets itself: several runs live in one process (a lockstep group)
_RESERVED = ("reinit",)
#: W&B refuses longer tags
_TAG_MAX = 64


class WandB(Logger):
    """A W&B run per cell (``wandb.init(**keys)`` with the defaults above)."""

    def __init__(self, **init: Any):
        self.init = init
        self.run: Any = None
        self.stages: set[str] = set()

    @staticmethod
    def installed() -> bool:
        return importlib.util.find_spec("wandb") is not None

    @staticmethod
    def check_params(params: dict[str, Any]) -> None:
        """The keys must be ``wandb.init`` parameters (checked against the installed wandb)."""
        from kdbench.registry import did_you_mean

        if not WandB.installed():
            raise PluginError(f"logger 'wandb' {missing_library('wandb', 'wandb')}")
        import wandb

        known = [p for p in inspect.signature(wandb.init).parameters if p not in _RESERVED]
        for key in params:
            if key not in known:
                raise PluginError(
                    f"logger 'wandb': {key!r} is not a parameter of wandb.init{did_you_mean(key, known)}; "
                    f"it takes: {', '.join(known)}"
                )

    def start(self, run: RunInfo) -> None:
        import wandb

        own = dict(self.init)
        tags = [f"{k}={v}"[:_TAG_MAX] for k, v in run.tags.items()] + list(own.pop("tags", None) or [])
        config = {**run.config, "cell_id": run.id, **(own.pop("config", None) or {})}
        settings = own.pop("settings", None) or {}
        if not isinstance(settings, wandb.Settings):
            # kdbench's progress lines stay on the console; W&B's own notices go to its debug log
            settings = wandb.Settings(**{"console": "off", "silent": True, **settings})
        kwargs = {
            "mode": "offline",
            "dir": str(run.dir),
            "project": run.group,
            "group": run.group,
            "name": run.name,
            "job_type": "cell",
            **own,
        }
        Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(**kwargs, tags=tags, config=config, settings=settings, reinit="create_new")

    def log_metrics(self, metrics: Mapping[str, float], step: int, stage: str) -> None:
        # W&B's own step must only grow; each stage (init, train) counts its epochs on its own axis
        axis = f"{stage}/epoch"
        if stage not in self.stages:
            self.stages.add(stage)
            self.run.define_metric(axis)
            self.run.define_metric(f"{stage}/*", step_metric=axis)
        self.run.log({**metrics, axis: step})

    def log_artifact(self, path: Path) -> None:
        # a copy in the run's files directory (uploaded with the run), not ``run.save``'s
        # symlink to a file a later attempt of the cell rewrites
        shutil.copy2(path, Path(self.run.dir) / path.name)

    def finish(self, status: str, metrics: Mapping[str, float]) -> None:
        if metrics:
            self.run.summary.update(dict(metrics))
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "done" else 1)
