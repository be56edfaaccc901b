"""Grid validation: every problem at once, with file, line and key path; exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdbench.config import load_grid
from kdbench.errors import ConfigError
from kdbench.runner import plan
from tests.conftest import kdbench_cli, write_grid


def test_valid_grid_resolves_defaults_and_plugin_params(tiny_grid):
    grid = load_grid(tiny_grid(methods="[ce, {kd: {T: 2}}]"))
    kd = grid.methods[1]
    assert kd.name == "kd" and kd.params["T"] == 2
    assert grid.methods[0].params == {}
    assert grid.pairs[0][0].params == {"width": 8}


def test_malformed_yaml_names_file_and_line(tmp_path: Path):
    f = write_grid(tmp_path / "g.yaml", "name: x\ndatasets: [mnist5k\npairs: []\n")
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    msg = str(e.value)
    assert str(f) in msg and "malformed YAML" in msg
    assert f"{f}:3" in msg or f"{f}:2" in msg


def test_all_problems_listed_at_once_with_lines_and_paths(tmp_path: Path):
    f = write_grid(
        tmp_path / "g.yaml",
        """\
name: bad
datasets:
  - mnist5kk
pairs:
  - teacher: smallcnn_wide
    student: smallcnn_thn
methods:
  - kd
  - {dkd: {beta: eight}}
  - {kd: {temperature: 4}}
seeds: [0, 1]
train:
  epochs: three
  colour: blue
""",
    )
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    problems = e.value.problems
    text = "\n".join(problems)
    assert f"{f}:13: train.epochs:" in text
    assert f"{f}:14: train.colour: unknown key" in text
    # the schema errors are reported even though plugin names are checked too
    assert "mnist5kk" in text and "did you mean 'mnist5k'" in text
    assert "smallcnn_thn" in text and "smallcnn_thin" in text


def test_plugin_params_checked_against_signature(tmp_path: Path):
    f = write_grid(
        tmp_path / "g.yaml",
        """\
name: bad
datasets: [mnist5k]
pairs:
  - {teacher: smallcnn_wide, student: smallcnn_thin}
methods:
  - {dkd: {beta: eight}}
  - {kd: {temperature: 4}}
""",
    )
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 2
    assert f"{f}:6: methods[0].dkd.beta:" in text
    assert f"{f}:7: methods[1].kd.temperature: unknown key" in text


def test_unknown_dataset_root_is_a_config_error(tmp_path: Path):
    f = write_grid(
        tmp_path / "g.yaml",
        f"""\
name: bad
output: {tmp_path / "runs"}
datasets:
  - {{cifar10: {{root: {tmp_path / "nowhere"}}}}}
pairs:
  - {{teacher: resnet8, student: resnet8}}
methods: [ce]
""",
    )
    with pytest.raises(ConfigError) as e:
        plan(load_grid(f))
    assert f"{f}:4: datasets[0]:" in str(e.value) and "nowhere" in str(e.value)


def test_cli_exit_code_2_and_nothing_written(tmp_path: Path):
    out = tmp_path / "runs"
    f = write_grid(
        tmp_path / "g.yaml",
        f"""\
name: bad
output: {out}
datasets: [mnist5k]
pairs:
  - {{teacher: smallcnn_wide, student: smallcnn_thin}}
methods: [kd, dkdd]
""",
    )
    r = kdbench_cli("run", str(f))
    assert r.returncode == 2, r.stderr
    assert "dkdd" in r.stderr and "did you mean 'dkd'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_missing_file_exit_2(tmp_path: Path):
    r = kdbench_cli("run", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2
    assert "file not found" in r.stderr


def test_repdistiller_preset_and_student_specific_lr(tmp_path: Path):
    from kdbench.grid import expand

    f = write_grid(
        tmp_path / "g.yaml",
        """\
name: rd
datasets: [digits]
pairs:
  - {teacher: resnet32x4, student: resnet8x4}
  - {teacher: resnet32x4, student: shufflev2}
methods: [kd]
train: {preset: repdistiller, epochs: 2}
""",
    )
    grid = load_grid(f)
    assert grid.config.train.milestones == [150, 180, 210] and grid.config.train.weight_decay == 5e-4
    assert grid.config.train.epochs == 2  # what the grid sets wins over the preset
    cells = expand(grid, [{}], [{}, {}])
    lrs = {c.student.name: c.train.lr for c in cells}
    assert lrs == {"resnet8x4": 0.05, "shufflev2": 0.01}


def test_external_models_are_expressible(tmp_path: Path):
    """torchvision by name, and the ViT → MobileNetV2 grid of the Transformers KD guide."""
    vit = tmp_path / "vit-checkpoint"
    vit.mkdir()
    (vit / "config.json").write_text('{"model_type": "vit", "num_labels": 3}')
    f = write_grid(
        tmp_path / "g.yaml",
        f"""\
name: ext
datasets: [digits]
pairs:
  - {{teacher: "hf:{vit}", student: "torchvision:mobilenet_v2", source: loaded}}
  - teacher: {{torchvision: {{name: resnet18, taps: {{stages: [layer1, layer2], classifier: fc}}}}}}
    student: torchvision:resnet18
methods: [kd]
""",
    )
    grid = load_grid(f)
    (t0, s0, src0), (t1, s1, _) = grid.pairs
    assert (t0.name, t0.params["path"]) == ("hf", str(vit))
    assert (s0.name, s0.params["name"]) == ("torchvision", "mobilenet_v2")
    assert src0.name == "loaded"
    assert t1.params["taps"]["stages"] == ["layer1", "layer2"]


def test_dry_run_lists_cells_and_writes_nothing(tiny_grid, tmp_path: Path):
    r = kdbench_cli("run", str(tiny_grid(methods="[ce, kd]", seeds="[0, 1]")), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "4 cells, 1 teacher(s)" in r.stderr
    assert r.stdout.count("to run") == 4
    # the parameters each method runs with, once per pair
    assert "parameters as run" in r.stdout and "T=4" in r.stdout
    assert "student sees" in r.stdout and "teacher sees" in r.stdout  # the resolved views
    assert not (tmp_path / "runs").exists()


def _weights_grid(tmp_path: Path, methods: str) -> Path:
    return write_grid(
        tmp_path / "w.yaml",
        f"""\
name: w
datasets: [digits]
pairs:
  - {{teacher: smallcnn_wide, student: smallcnn_thin}}
methods: {methods}
""",
    )


def test_loss_weights_key_and_legacy_weights_give_the_same_cell(tmp_path: Path):
    from kdbench.grid import expand

    legacy = load_grid(_weights_grid(tmp_path, "[{fitnet: {weights: {hint: 50}}}]"))
    explicit = load_grid(_weights_grid(tmp_path, "[{fitnet: {loss_weights: {hint: 50}}}]"))
    (a,), (b,) = expand(legacy, [{}], [{}]), expand(explicit, [{}], [{}])
    assert a.method.weights == b.method.weights == {"hint": 50}
    assert "weights" not in a.method.params and "loss_weights" not in b.method.params
    assert a.id == b.id and a.method.label == b.method.label == "fitnet(w.hint=50)"


def test_a_methods_own_weights_parameter_is_settable(tmp_path: Path):
    """ckakd has a `weights` parameter: `weights:` sets it, `loss_weights:` the engine's."""
    from kdbench.grid import expand

    grid = load_grid(
        _weights_grid(tmp_path, "[{ckakd: {n_groups: 2, weights: [1, 3], loss_weights: {ckakd: 2}}}, ckakd]")
    )
    own, default = expand(grid, [{}], [{}])
    assert own.method.params["weights"] == [1, 3] and own.method.weights == {"ckakd": 2}
    assert own.method.label == "ckakd(n_groups=2,weights=[1 3],w.ckakd=2)"
    assert "weights" not in default.method.params and default.method.weights == {}


def test_loss_weights_problems_are_reported(tmp_path: Path):
    f = _weights_grid(
        tmp_path,
        "[{fitnet: {loss_weights: {hnt: 5}}}, {kd: {weights: {kd: 1}, loss_weights: {kd: 2}}}, "
        "{ckakd: {loss_weights: fast}}]",
    )
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    text = "\n".join(e.value.problems)
    assert "methods[0].fitnet.loss_weights.hnt: fitnet has no loss term 'hnt'" in text
    assert "methods[1].kd.weights: set the loss-term weights once" in text
    assert "methods[2].ckakd.loss_weights: expected a mapping of loss term -> number" in text


def test_keys_without_effect_are_rejected(tmp_path: Path):
    f = write_grid(
        tmp_path / "g.yaml",
        """\
name: inert
datasets: [digits]
pairs:
  - {teacher: smallcnn_wide, student: smallcnn_thin}
methods: [kd]
train: {seed: 3}
teacher_train: {views: {strong: randaugment}, init_lr: 0.01, device: cpu, seed: 1}
""",
    )
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4
    assert f"{f}:6: train.seed: has no effect here" in text and "`seeds:`" in text
    for k in ("views", "init_lr", "device"):
        assert f"{f}:7: teacher_train.{k}: has no effect here" in text


def test_packaged_dataset_refuses_a_root(tmp_path: Path):
    f = write_grid(
        tmp_path / "g.yaml",
        f"""\
name: root
output: {tmp_path / "runs"}
datasets:
  - {{mnist5k: {{root: {tmp_path}}}}}
pairs:
  - {{teacher: smallcnn_wide, student: smallcnn_thin}}
methods: [kd]
""",
    )
    with pytest.raises(ConfigError) as e:
        plan(load_grid(f))
    assert f"{f}:4: datasets[0]:" in str(e.value) and "remove `root`" in str(e.value)


def test_external_model_parameters_checked_against_the_library(tmp_path: Path):
    """torchvision/timm/hf take **kwargs: the library itself judges them at config time."""
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text('{"model_type": "vit", "num_labels": 3}')
    f = write_grid(
        tmp_path / "g.yaml",
        f"""\
name: ext
datasets: [digits]
pairs:
  - {{teacher: {{torchvision: {{name: resnet18, colour: 1}}}}, student: "torchvision:resnet81"}}
  - teacher: {{timm: {{name: resnet18, colour: 1}}}}
    student: {{timm: {{name: resnet18, drop_rate: 0.1}}}}
  - {{teacher: {{hf: {{path: {vit}, colour: 1}}}}, student: {{hf: {{path: {tmp_path / "none"}}}}}}}
  - teacher: {{hf: {{path: {vit}, hidden_dropout_prob: 0.2}}}}
    student: {{torchvision: {{name: resnet18, width_per_group: 32}}}}
methods: [kd]
""",
    )
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    text = "\n".join(e.value.problems)
    assert f"{f}:4: pairs[0].teacher:" in text and "unexpected keyword argument 'colour'" in text
    assert "pairs[0].student:" in text and "no classification model 'resnet81'; did you mean resnet18" in text
    assert f"{f}:5: pairs[1].teacher:" in text and "timm model 'resnet18'" in text
    assert "pairs[1].student" not in text  # drop_rate is a timm ResNet argument
    assert f"{f}:7: pairs[2].teacher:" in text and "colour: neither a field of the checkpoint" in text
    assert "pairs[2].student:" in text and "no config.json" in text
    assert "pairs[3].teacher" not in text  # a config field
    assert "pairs[3].student:" in text and "BasicBlock only supports groups=1" in text
    assert len(e.value.problems) == 6


def test_dry_run_catches_a_method_that_does_not_fit_the_pair(tmp_path: Path):
    """FSP needs equal channels per stage: found before any teacher trains, with the grid line."""
    out = tmp_path / "runs"
    f = write_grid(
        tmp_path / "g.yaml",
        f"""\
name: fsp
output: {out}
datasets: [{{digits: {{limit: 200}}}}]
pairs:
  - {{teacher: {{smallcnn: {{width: 8}}}}, student: {{smallcnn: {{width: 4}}}}}}
  - {{teacher: {{smallcnn: {{width: 4}}}}, student: {{smallcnn: {{width: 4}}}}}}
methods: [kd, fsp]
""",
    )
    r = kdbench_cli("run", str(f), "--dry-run")
    assert r.returncode == 1, r.stderr  # like a run that would have failed cells
    err = " ".join(r.stderr.split())  # undo the console's line wrapping
    assert "1 cell(s) cannot run" in err
    assert f"{f}:7: methods[1]: fsp does not fit smallcnn(width=4) student, smallcnn(width=8) teacher" in err
    assert "same number of stages with equal channels" in err
    assert err.count("fsp does not fit") == 1  # the equal-width pair fits
    assert r.stdout.count("incompatible") == 1 and r.stdout.count("to run") == 3
    assert not out.exists()


def test_incompatible_cells_fail_at_once_without_training_a_teacher(tmp_path: Path):
    from kdbench.runner import execute
    from kdbench.store import Store

    f = write_grid(
        tmp_path / "g.yaml",
        f"""\
name: fsp
output: {tmp_path / "runs"}
datasets: [{{digits: {{limit: 200}}}}]
pairs:
  - {{teacher: {{smallcnn: {{width: 8}}}}, student: {{smallcnn: {{width: 4}}}}}}
methods: [fsp]
seeds: [0, 1]
""",
    )
    p = plan(load_grid(f))
    assert len(p.incompatible) == 2 and all(
        ":6: methods[0]: fsp does not fit" in m for m in p.incompatible.values()
    )
    counts = execute(p)
    assert counts["failed"] == 2 and counts["done"] == 0
    store = Store(p.run_dir / "results.sqlite")
    rows = store.cells()
    store.close()
    assert {r["status"] for r in rows} == {"failed"} and all("ConfigError" in r["error"] for r in rows)
    assert not list((p.run_dir / "teachers").glob("*.pt"))  # no teacher was trained for nothing


def _preset_grid(tmp_path: Path, methods: str, preset: str = "mdistiller") -> Path:
    return write_grid(
        tmp_path / "md.yaml",
        f"""\
name: md
datasets: [digits]
pairs:
  - {{teacher: resnet56, student: resnet20}}
  - {{teacher: resnet110, student: resnet32}}
  - {{teacher: vgg13, student: mobilenetv2}}
  - {{teacher: wrn_40_2, student: wrn_40_1}}
  - {{teacher: resnet32x4, student: resnet8x4}}
methods: {methods}
train: {{preset: {preset}, epochs: 1}}
""",
    )


def test_mdistiller_preset_applies_the_reference_values_per_pair(tmp_path: Path):
    from kdbench.grid import expand

    grid = load_grid(
        _preset_grid(tmp_path, "[dkd, {dkd: {beta: 3}}, reviewkd, dist, {dist: {loss_weights: {dist: 1}}}]")
    )
    cells = expand(grid, [{}], [{}] * 5)
    by = {(c.method.label, c.student.name): c.method for c in cells}
    betas = {
        s: by["dkd", s].params["beta"]
        for s in ("resnet20", "resnet32", "mobilenetv2", "wrn_40_1", "resnet8x4")
    }
    assert betas == {"resnet20": 2.0, "resnet32": 2.0, "mobilenetv2": 6.0, "wrn_40_1": 6.0, "resnet8x4": 8.0}
    assert by["dkd", "resnet20"].filled_by == {"beta": "mdistiller"}
    assert "beta=2 (mdistiller)" in by["dkd", "resnet20"].resolved()
    # what the grid sets wins
    assert {by["dkd(beta=3)", s].params["beta"] for s in ("resnet20", "mobilenetv2")} == {3}
    assert by["reviewkd", "resnet20"].weights == {"reviewkd": 5.0}
    assert by["dist", "resnet8x4"].weights == {"dist": 2.0}
    assert by["dist(w.dist=1)", "resnet8x4"].weights == {"dist": 1}
    # mdistiller's students with their own learning rate (as in RepDistiller)
    lrs = {c.student.name: c.train.lr for c in cells}
    assert lrs["mobilenetv2"] == 0.01 and lrs["resnet8x4"] == 0.05
    # without the preset nothing changes: the method's own defaults, no weights in the cell
    plain = expand(load_grid(_preset_grid(tmp_path, "[dkd, reviewkd]", "repdistiller")), [{}], [{}] * 5)
    assert {c.method.params.get("beta", 8.0) for c in plain} == {8.0}
    assert all(c.method.weights == {} and c.method.filled_by == {} for c in plain)


def test_filled_by_is_presentation_only(tmp_path: Path):
    """The marker of preset-filled values does not enter the id: resnet32x4's beta 8 is the default."""
    from kdbench.grid import expand

    md = expand(load_grid(_preset_grid(tmp_path, "[dkd]")), [{}], [{}] * 5)[-1]
    data = md.to_dict()
    assert data["method"]["filled_by"] == {"beta": "mdistiller"}
    data["method"].pop("filled_by")
    from kdbench.cells import Cell

    assert Cell.model_validate(data).content_id() == md.id


def test_a_pair_can_train_its_teacher_on_its_own_dataset(tmp_path: Path):
    f = write_grid(
        tmp_path / "g.yaml",
        """\
name: tds
datasets: [{digits: {limit: 400}}]
pairs:
  - {teacher: smallcnn_wide, student: smallcnn_thin, teacher_dataset: {digits: {limit: 300}}}
  - {teacher: smallcnn_wide, student: smallcnn_thin}
methods: [kd]
""",
    )
    p = plan(load_grid(f))
    own, shared = p.cells
    assert own.dataset == shared.dataset and own.dataset.params["limit"] == 400
    assert own.teacher.dataset.name == "digits" and own.teacher.dataset.params["limit"] == 300
    assert own.teacher.dataset.fingerprint  # fingerprinted like any dataset: changed data, new teacher
    assert shared.teacher.dataset == shared.dataset
    assert own.teacher.id != shared.teacher.id and own.id != shared.id
    assert len(p.teachers) == 2


def test_teacher_dataset_must_match_the_students_images(tmp_path: Path):
    f = write_grid(
        tmp_path / "g.yaml",
        """\
name: tds
datasets: [digits]
pairs:
  - {teacher: smallcnn_wide, student: smallcnn_thin, teacher_dataset: mnist5k}
  - {teacher: smallcnn_wide, student: smallcnn_thin, teacher_dataset: {digits: {limitt: 3}}}
methods: [kd]
""",
    )
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    assert f"{f}:5: pairs[1].teacher_dataset.limitt: unknown key" in str(e.value)
    f.write_text(f.read_text().replace("limitt", "limit"))
    with pytest.raises(ConfigError) as e:
        plan(load_grid(f))
    assert f"{f}:4: pairs[0].teacher_dataset: mnist5k has (classes, channels, image size) (10, 1, 28)" in str(
        e.value
    )


# --------------------------------------------------------------------------- big files, alias bombs


def test_a_big_grid_without_aliases_gets_its_real_error(tmp_path: Path):
    # more nodes than the alias bound (config.MAX_ALIAS_NODES, 100,000), written out in full:
    # only what aliases produce is bounded, so the file reaches validation and gets its own
    # error (an unknown key at line 6) instead of "an alias bomb?"
    lines = ["name: big", "datasets: [digits]", "pairs: [{teacher: smallcnn, student: smallcnn}]"]
    lines += ["methods: [kd]", "seeds: [0]", "colour: blue"]
    lines += ["train: {epochs: 1}", "notes: [" + ",".join(["0"] * 101_000) + "]"]
    f = tmp_path / "big.yaml"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_grid(f)
    text = "\n".join(e.value.problems)
    assert f"{f}:6: colour: unknown key" in text and "alias bomb" not in str(e.value)


def test_alias_bomb_message_names_the_key_where_the_expansion_happens(tmp_path: Path):
    from kdbench.config import load_yaml

    lines = ["name: x", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(bomb)
    # a1..a4 expand to 9·10 + 9·91 + 9·820 + 9·7381 = 74,880 nodes; a5's first alias passes 100,000
    assert "alias bomb" in str(e.value) and "at a5[0] (line 7)" in str(e.value)
    # an alias inside its own anchor expands forever: refused the same way, not a RecursionError
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: x\nrecipe: &r {epochs: 1, again: *r}\n")
    with pytest.raises(ConfigError, match=r"alias bomb\?\), passing the bound at recipe.again \(line 2\)"):
        load_yaml(loop)


# --------------------------------------------------------------------------- method views


def test_a_method_whose_view_the_grid_lacks_is_a_config_error_before_training(tmp_path: Path):
    """consistency trains its student on train.views.strong and MLKD reads it as its second view:
    a grid without it used to train them on something else, with a log warning at most."""
    out = tmp_path / "runs"
    body = f"""\
name: views
output: {out}
datasets: [{{digits: {{limit: 100}}}}]
pairs:
  - {{teacher: {{smallcnn: {{width: 4}}}}, student: {{smallcnn: {{width: 4}}}}}}
methods:
  - kd
  - consistency
  - mlkd
train: {{epochs: 1, augment: flip_crop, views: {{}}}}
"""
    f = write_grid(tmp_path / "g.yaml", body)
    with pytest.raises(ConfigError) as e:
        plan(load_grid(f))
    text = "\n".join(e.value.problems)
    assert f"{f}:8: methods[1]: consistency trains on the student view 'strong', which train.views" in text
    assert f"{f}:9: methods[2]: mlkd trains on the view 'strong', which train.views" in text
    assert "kd " not in text.replace("mlkd", "") and not out.exists()
    # with the view (the default train.views has it), the same grid plans
    ok = write_grid(tmp_path / "ok.yaml", body.replace("views: {}", "views: {strong: randaugment}"))
    assert len(plan(load_grid(ok)).cells) == 3
