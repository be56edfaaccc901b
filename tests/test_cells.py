"""Typed cells: same ids as the dict cells before them, clear refusal of other formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdbench import registry
from kdbench.cells import CELL_FORMAT, Cell, CellFormatError, CellResult, canonical
from kdbench.config import load_grid
from kdbench.grid import expand
from tests.conftest import write_grid

FIXTURES = Path(__file__).parent / "fixtures"

GRID_A = """\
name: pin_a
datasets:
  - {digits: {limit: 400}}
pairs:
  - teacher: {smallcnn: {width: 8}}
    student: {smallcnn: {width: 4}}
methods: [ce, kd, {dkd: {beta: 6, weights: {dkd: 2}}}, {fitnet: {weights: {hint: 50}}}, ckakd]
seeds: [0, 1]
train: {epochs: 1, batch_size: 64, lr: 0.05, schedule: cosine, views: {}}
teacher_train: {epochs: 2, batch_size: 64, lr: 0.05, schedule: cosine, views: {}}
eval: {batch_size: 500}
"""

GRID_C = """\
name: pin_c
datasets: [digits, mnist5k]
pairs:
  - {teacher: resnet32x4, student: shufflev2}
  - teacher: {torchvision: {name: resnet18, taps: {stages: [layer1, layer2], classifier: fc}}}
    student: torchvision:resnet18
    source: loaded
methods: [kd, {reviewkd: {warmup: 5}}]
seeds: [3]
train: {preset: repdistiller, epochs: 2, augment: flip_crop}
teacher_train: {preset: mdistiller, epochs: 3, seed: 7}
"""

# Cell ids computed by the dict-based grid.expand of commit 0c477a4 (before typed cells),
# with plugin versions pinned to "pinned==1" (see _expand) and fingerprints as in _expand.
PINNED = {
    "A": [
        "670918661ba44da8", "7ef3561904f59ed3", "cfa3486ec169decc", "3d815c6d3a151d33",
        "c4a945192c54d5a1", "e410d1ad0e9e0fb3", "fd80f4003a6e72ed", "a0177e99d2619451",
        # ckakd's two cells: new ids since it relates per-block taps by default (layers: blocks)
        "890b69c32cf2b87c", "638ddf30a8dafa6e",
    ],
    "C": [
        "ceb1e9e3d3b11865", "d88f151545bdd8b6", "1db061461a6ba8fc", "236de0fec996d3e1",
        "9b9a05df982ea04a", "f28b5b127d8d654b", "67a7f63ff4904259", "cbe6bf1fec016118",
    ],
}  # fmt: skip
PINNED_TEACHER = {"A": "968ba65595e0a0c7", "C": "31840536f6f831a7"}


def _expand(tmp_path: Path, body: str, monkeypatch) -> list[Cell]:
    monkeypatch.setattr(registry, "versions", lambda refs: {f"{k}:{n}": "pinned==1" for k, n in refs})
    grid = load_grid(write_grid(tmp_path / "g.yaml", body))
    ds_fp = [{"sha256": f"ds{i}"} for i in range(len(grid.datasets))]
    src_fp = [{"source": f"s{i}"} for i in range(len(grid.pairs))]
    return expand(grid, ds_fp, src_fp)


@pytest.mark.parametrize("key,body", [("A", GRID_A), ("C", GRID_C)])
def test_ids_equal_those_of_the_dict_cells(tmp_path, monkeypatch, key, body):
    cells = _expand(tmp_path, body, monkeypatch)
    assert all(isinstance(c, Cell) for c in cells)
    assert [c.id for c in cells] == PINNED[key]
    assert cells[0].teacher.id == PINNED_TEACHER[key]
    for c in cells:
        assert c.content_id() == c.id and c.teacher.content_id() == c.teacher.id


def test_old_config_json_converts_to_the_same_dict(tmp_path, monkeypatch):
    """A config.json written by the dict code reads back unchanged and keeps its id."""
    old = json.loads((FIXTURES / "cell_format1.json").read_text())
    cell = Cell.from_dict(old)
    assert canonical(cell.model_dump(mode="json")) == canonical(old)
    assert cell.id == old["id"] == "c4a945192c54d5a1"
    assert cell.method.weights == {"dkd": 2} and cell.method.params["beta"] == 6
    assert cell.teacher.train.epochs == 2 and cell.eval.batch_size == 500
    # and the grid it came from expands to exactly that cell
    new = _expand(tmp_path, GRID_A, monkeypatch)[4]
    assert canonical(new.model_dump(mode="json")) == canonical(old)


@pytest.mark.parametrize("fmt", [0, 2, None])
def test_other_formats_are_refused_with_the_way_out(fmt):
    old = json.loads((FIXTURES / "cell_format1.json").read_text())
    if fmt is None:
        del old["format"]
    else:
        old["format"] = fmt
    with pytest.raises(CellFormatError) as e:
        Cell.from_dict(old, where="runs/x/cells/c4/config.json")
    msg = str(e.value)
    assert "runs/x/cells/c4/config.json" in msg and f"cell format {CELL_FORMAT}" in msg
    assert "--out" in msg


def test_unknown_field_or_changed_content_is_refused():
    old = json.loads((FIXTURES / "cell_format1.json").read_text())
    with pytest.raises(CellFormatError, match="colour"):
        Cell.from_dict({**old, "colour": "blue"})
    with pytest.raises(CellFormatError, match="no longer hashes"):
        Cell.from_dict({**old, "seed": 5})


def test_cells_are_frozen_and_round_trip(tmp_path, monkeypatch):
    c = _expand(tmp_path, GRID_A, monkeypatch)[0]
    with pytest.raises(ValueError):
        c.seed = 3  # type: ignore[misc]
    back = Cell.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.id == c.id
    assert c.describe == "ce smallcnn(width=8)→smallcnn(width=4) digits seed 0"


def test_result_round_trip_and_store_accepts_records(tmp_path, monkeypatch):
    from kdbench.store import Store, write_json_atomic

    c = _expand(tmp_path, GRID_A, monkeypatch)[1]
    r = CellResult(cell=c, status="done", metrics={"top1": 90.0}, env={"torch": "x"}, wall_s=1.5)
    write_json_atomic(tmp_path / "result.json", r)
    back = CellResult.from_dict(json.loads((tmp_path / "result.json").read_text()))
    assert back == r
    store = Store(tmp_path / "results.sqlite")
    store.add_pending([c])
    store.record(r)
    (row,) = store.cells()
    assert row["id"] == c.id and row["status"] == "done" and row["config"] == c.to_dict()
    store.close()


def test_val_fraction_and_every_enter_the_id_only_when_set(tmp_path, monkeypatch):
    base = _expand(tmp_path, GRID_A, monkeypatch)
    assert "val_fraction" not in base[0].to_dict()["eval"] and "every" not in base[0].to_dict()["eval"]
    assert "val_fraction" not in base[0].to_dict()["teacher"]
    explicit_zero = _expand(
        tmp_path, GRID_A.replace("{batch_size: 500}", "{batch_size: 500, val_fraction: 0}"), monkeypatch
    )
    assert [c.id for c in explicit_zero] == PINNED["A"]

    val = _expand(
        tmp_path, GRID_A.replace("{batch_size: 500}", "{batch_size: 500, val_fraction: 0.1}"), monkeypatch
    )
    assert val[0].eval.val_fraction == 0.1 and val[0].teacher.val_fraction == 0.1
    assert val[0].id != base[0].id
    # the teacher holds out the same split: a teacher of its own
    assert val[0].teacher.id != base[0].teacher.id

    every = _expand(tmp_path, GRID_A.replace("{batch_size: 500}", "{batch_size: 500, every: 2}"), monkeypatch)
    assert every[0].eval.every == 2 and every[0].id != base[0].id
    assert every[0].teacher.id == base[0].teacher.id  # per-epoch evaluation does not change the teacher
    assert Cell.from_dict(every[0].to_dict()) == every[0]


@pytest.mark.parametrize("bad", ["val_fraction: 1.0", "val_fraction: -0.1", "every: -1"])
def test_eval_settings_are_validated(tmp_path, bad):
    from kdbench.errors import ConfigError

    body = GRID_A.replace("{batch_size: 500}", "{batch_size: 500, " + bad + "}")
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path / "g.yaml", body))
    assert "eval." + bad.split(":")[0] in str(e.value)


def test_changed_entries_say_why_a_finished_cell_gets_a_new_id(tmp_path, monkeypatch):
    from kdbench.cells import changed_entries

    old = json.loads((FIXTURES / "cell_format1.json").read_text())
    monkeypatch.setattr(registry, "versions", lambda refs: {f"{k}:{n}": "pinned==1" for k, n in refs})
    grid = load_grid(write_grid(tmp_path / "g.yaml", GRID_A))
    cells = expand(grid, [{"sha256": "new"}], [{"source": "s0"}])  # the data's fingerprint changed
    assert old["id"] not in {c.id for c in cells}
    assert changed_entries(cells, [old]) == {
        "dataset.fingerprint.sha256, teacher.dataset.fingerprint": [old["id"]]
    }
    assert changed_entries(cells, [{**old, "format": 0}]) == {"cell format 0 -> 1": [old["id"]]}
    same = expand(grid, [{"sha256": "ds0"}], [{"source": "s0"}])
    assert changed_entries(same, [old]) == {}  # unchanged: same id, nothing to say


def test_rerun_after_an_edit_says_what_changed(tmp_path):
    import io

    from rich.console import Console

    from kdbench.runner import execute, plan

    body = f"""\
name: edit
output: {tmp_path / "runs"}
datasets: [{{digits: {{limit: 200}}}}]
pairs:
  - {{teacher: smallcnn_wide, student: smallcnn_thin}}
methods: [ce]
train: {{epochs: 1, lr: 0.05, views: {{}}}}
"""
    f = write_grid(tmp_path / "g.yaml", body)
    assert execute(plan(load_grid(f)), console=Console(file=io.StringIO()))["done"] == 1
    f.write_text(body.replace("lr: 0.05", "lr: 0.02"))
    out = io.StringIO()
    counts = execute(plan(load_grid(f)), console=Console(file=out, width=300))
    assert counts["done"] == 1 and counts["skipped"] == 0
    assert (
        "1 finished cell(s) of this run directory run again under new ids: their train.lr changed"
        in out.getvalue()
    )


def test_row_labels_spell_nested_train_overrides_as_dotted_keys():
    """A method row's nested train overrides read as dotted keys, augmenters by name with the
    parameters the row set, not as raw dicts."""
    from kdbench.config import PluginRef
    from kdbench.grid import method_label

    jtt = PluginRef(kind="losses", name="kd", train={"jtt": {"lambda_up": 5, "epochs": 1}})
    assert method_label(jtt) == "kd(train.jtt.epochs=1,train.jtt.lambda_up=5)"
    ra = PluginRef(
        kind="augmenters", name="randaugment", params={"num_ops": 1, "magnitude": 9}, given=["num_ops"]
    )
    views = PluginRef(
        kind="losses",
        name="mlkd",
        train={"views": {"strong": {"randaugment": {"num_ops": 1}}}, "sampler": "group_balanced"},
        train_views={"strong": ra},
    )
    want = "mlkd(train.sampler=group_balanced,train.views.strong=randaugment(num_ops=1))"
    assert method_label(views) == want
