"""MLflow: an experiment per grid, a run per cell, in a file store under the run directory by
default (``runs/<grid>/mlruns``; ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri
runs/<grid>/mlruns`` shows it).

The grid's keys are those of MLflow's own calls that open a run: ``MlflowClient(tracking_uri,
registry_uri)``, ``create_experiment(experiment_name, artifact_location)``, ``create_run(run_name,
tags)`` and the run's ``description``. A run holds the cell's config as params (dotted keys:
``train.lr``, ``method.params.T``), tags (method, pair, dataset, seed, cell id, grid), every
per-epoch scalar with its stage's epoch as step, the final metrics, and the cell's files as
artefacts; it ends FINISHED, FAILED, or KILLED (stopped, to be resumed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kdbench.errors import PluginError
from kdbench.loggers.base import Logger, RunInfo, flat_config, missing_library, safe_key

#: MLflow's limits: a param value's length, params or metrics per batch call
_PARAM_VALUE_MAX = 6000
_BATCH = 100
_STATUS = {"done": "FINISHED", "failed": "FAILED"}


class MLflow(Logger):
    """An MLflow run per cell (see the module's docstring for what it holds)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        experiment_name: str | None = None,
        artifact_location: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        description: str | None = None,
    ):
        self.tracking_uri, self.registry_uri = tracking_uri, registry_uri
        self.experiment_name, self.artifact_location = experiment_name, artifact_location
        self.run_name, self.tags, self.description = run_name, dict(tags or {}), description
        self.client: Any = None
        self.run_id = ""

    @staticmethod
    def installed() -> bool:
        return importlib.util.find_spec("mlflow") is not None

    @staticmethod
    def check_params(params: dict[str, Any]) -> None:
        if not MLflow.installed():
            raise PluginError(f"logger 'mlflow' {missing_library('mlflow', 'mlflow')}")

    def start(self, run: RunInfo) -> None:
        uri = self.tracking_uri or (run.run_dir / "mlruns").resolve().as_uri()
        store = _file_store(uri)
        if store is not None:
            # the file store is what needs no server or database; MLflow 3 asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri, registry_uri=self.registry_uri)
        experiment = self._experiment(self.experiment_name or run.group, store)
        tags = {f"kdbench.{k}": v for k, v in run.tags.items()}
        tags["kdbench.grid"] = run.group
        if self.description:
            tags["mlflow.note.content"] = self.description
        created = self.client.create_run(
            experiment, run_name=self.run_name or run.name, tags={**tags, **self.tags}
        )
        self.run_id = created.info.run_id
        params = [
            Param(safe_key(k), _param_value(v))
            for k, v in {**flat_config(run.config), "cell_id": run.id}.items()
        ]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _BATCH])

    def _experiment(self, name: str, store: Path | None) -> str:
        """The experiment's id, created by the first cell (under a lock: concurrent workers
        would otherwise create two experiments of one name in a file store)."""
        from kdbench.artifacts import file_lock

        def get_or_create() -> str:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            return self.client.create_experiment(name, artifact_location=self.artifact_location)

        if store is None:
            return get_or_create()
        with file_lock(store / ".kdbench-experiments.lock"):
            return get_or_create()

    def log_metrics(self, metrics: Mapping[str, float], step: int, stage: str) -> None:
        self._metrics(metrics, step)

    def _metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(safe_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), _BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _BATCH])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str, metrics: Mapping[str, float]) -> None:
        if metrics:
            self._metrics(metrics, 0)
        self.client.set_terminated(self.run_id, _STATUS.get(status, "KILLED"))


def _file_store(uri: str) -> Path | None:
    """The directory of a file-store tracking URI (``file:...`` or a plain path), else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (a Windows drive letter too)
        return Path(uri)
    return None


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return text[:_PARAM_VALUE_MAX]
