"""A method row's ``train:`` override (group-balanced kd next to kd) and ``eval: {dfr: true}``."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdbench.config import load_grid
from kdbench.errors import ConfigError
from kdbench.grid import expand
from tests.conftest import write_grid

GRID = """
name: g
output: {out}
datasets: [digits]
pairs:
  - teacher: {{smallcnn: {{width: 8}}}}
    student: {{smallcnn: {{width: 4}}}}
methods: {methods}
train: {{epochs: 1, views: {{}}}}
eval: {{dfr: true}}
"""


def _grid(tmp_path: Path, methods: str):
    return load_grid(write_grid(tmp_path / "g.yaml", GRID.format(out=tmp_path / "runs", methods=methods)))


def _cells(grid):
    n = len(grid.pairs)
    return expand(grid, [{"d": 1}] * len(grid.datasets), [{}] * n, [None] * n)


def test_method_train_override_makes_its_own_row_and_cells(tmp_path: Path):
    grid = _grid(tmp_path, "[kd, {kd: {T: 2, train: {sampler: group_balanced, augment: flip_crop}}}]")
    plain, balanced = _cells(grid)
    assert plain.method.label == "kd"
    assert balanced.method.label == "kd(T=2,train.augment=flip_crop,train.sampler=group_balanced)"
    assert balanced.train.sampler == "group_balanced" and plain.train.sampler == "shuffle"
    assert balanced.augment.name == "flip_crop" and plain.augment.name == "none"
    assert "train" not in balanced.method.params and balanced.method.params["T"] == 2
    assert plain.id != balanced.id and plain.teacher.id == balanced.teacher.id
    assert balanced.eval.dfr is True
    # the default sampler stays out of the record, so cells of older grids keep their ids
    assert "sampler" not in plain.to_dict()["train"]


@pytest.mark.parametrize(
    "row, message",
    [
        ("{kd: {train: {seed: 3}}}", "seed is set for the whole grid"),
        ("{kd: {train: {sampler: sometimes}}}", "sampler"),
        ("{kd: {train: {lr: -1}}}", "lr"),
        ("{kd: {train: {nonsense: 1}}}", "unknown key"),
        ("{kd: {train: {augment: no_such_augmenter}}}", "no_such_augmenter"),
        ("{kd: {train: 5}}", "expected a mapping of train fields"),
    ],
)
def test_method_train_override_errors_name_the_key(tmp_path: Path, row: str, message: str):
    with pytest.raises(ConfigError) as e:
        _grid(tmp_path, f"[{row}]")
    assert message in str(e.value) and "methods[0].kd.train" in str(e.value)
