"""OFA-KD: golden tests against the authors' code, the projector chosen per pair, a tiny
heterogeneous grid (ViT ↔ CNN) end to end.

``tests/fixtures/golden/ofa.npz`` (see ``ofa.md``) holds the authors' ``ofa_loss`` on fixed logits
and their whole OFA distiller's forward on three students — a CNN, a ViT with a class token, a
Swin / MLP-like token hierarchy — with the projector weights their code initialised, the losses,
every branch's logits and the gradients w.r.t. the logits, the stage features and the weights.
"""

from __future__ import annotations

import ast
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, MethodContext
from kdbench.methods.ofa import OFA, PatchMerge, TokenBranch, TransformerBlock, ofa_loss

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
RTOL = 1e-6


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "ofa.npz") as f:
        return dict(f)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))


def _close(got: torch.Tensor | float, want: np.ndarray | float) -> None:
    got_t = torch.as_tensor(got, dtype=torch.float64).detach()
    torch.testing.assert_close(got_t, _t(np.asarray(want, dtype=np.float64)), rtol=RTOL, atol=1e-12)


def _ctx(student_shapes: dict, teacher_shapes: dict, num_classes: int = 10) -> MethodContext:
    return MethodContext(
        num_classes=num_classes,
        num_train=100,
        epochs=1,
        batch_size=4,
        student_shapes=student_shapes,
        teacher_shapes=teacher_shapes,
    )


def _batch(y: torch.Tensor) -> Batch:
    return Batch(x=torch.zeros(len(y), 1), y=y, index=torch.arange(len(y)))


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("eps,T", [(1.0, 1.0), (1.5, 1.0), (0.7, 2.0)])
def test_ofa_loss_matches_the_authors(golden, eps, T):
    zs = _t(golden["loss_zs"]).requires_grad_()
    loss = ofa_loss(zs, _t(golden["loss_zt"]), _t(golden["loss_y"]), eps, T)
    _close(loss, golden[f"loss_e{eps:g}_T{T:g}"])
    loss.backward()
    _close(zs.grad, golden[f"grad_e{eps:g}_T{T:g}"])


def test_ofa_loss_at_eps_1_is_the_cross_entropy_with_the_teacher_distribution(golden):
    zs, zt, y = _t(golden["loss_zs"]), _t(golden["loss_zt"]), _t(golden["loss_y"])
    soft_ce = -(F.softmax(zt / 2, 1) * F.log_softmax(zs / 2, 1)).sum(1).mean()
    _close(ofa_loss(zs, zt, y, 1.0, 2.0), soft_ce.item())
    # ε > 1 raises the target weight (1 + p)^ε − 1 above p and lowers every other p^ε below p
    assert ofa_loss(zs, zt, y, 1.5) != ofa_loss(zs, zt, y, 1.0)


def test_ofa_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    zt = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (5,), generator=g)
    assert gradcheck(lambda z: ofa_loss(z, zt, y, 1.3, 1.5), (zs,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the distiller


def _reference_case(g: dict, case: str):
    """OFA built as the reference's stub student of ``case`` and loaded with the reference's weights."""
    p = f"{case}__"
    shapes = [tuple(ast.literal_eval(s)) for s in g[p + "shapes"]]
    d_s, d_t = (int(v) for v in g[p + "dims"])
    stages = [int(i) for i in g[p + "stages"]]
    # kdbench's stage taps start with the stem; the reference's stages 1..4 are taps 1..4
    student_shapes = {"logits": (10,), "stages": [shapes[0], *shapes], "pooled": (d_s,)}
    m = OFA(
        _ctx(student_shapes, {"logits": (10,), "pooled": (d_t,)}),
        eps=[float(e) for e in g[p + "eps"]],
        T=float(g[p + "T"]),
        stages=stages,
    ).double()
    names = list(g[p + "state_names"])
    ours = m.branches.state_dict()
    assert len(ours) == len(names)
    loaded = {}
    for j, (key, mine) in enumerate(ours.items()):
        ref = _t(g[f"{p}state{j:03d}"])
        assert tuple(mine.shape) == tuple(ref.shape), (key, names[j])
        loaded[key] = ref
    m.branches.load_state_dict(loaded)
    return m, shapes, stages


@pytest.mark.parametrize("case", ["cnn", "vit", "hier"])
def test_distiller_matches_the_authors_projectors_and_losses(golden, case):
    p = f"{case}__"
    m, shapes, stages = _reference_case(golden, case)
    m.train()
    zs = _t(golden[p + "zs"]).requires_grad_()
    zt, y = _t(golden[p + "zt"]), _t(golden[p + "y"])
    feats = {i: _t(golden[f"{p}feat{i}"]).requires_grad_() for i in stages}
    stage_feats = [torch.zeros(len(y), *shapes[0], dtype=torch.float64)]
    stage_feats += [
        feats.get(i, torch.zeros(len(y), *shapes[i - 1], dtype=torch.float64)) for i in (1, 2, 3, 4)
    ]
    heads = {}
    for i, branch in zip(stages, m.branches, strict=True):
        branch.register_forward_hook(lambda mod, inp, out, i=i: heads.__setitem__(i, out.detach()))
    terms = m(Features(logits=zs, stages=stage_feats), Features(logits=zt), _batch(y))

    ce = F.cross_entropy(zs, y)
    _close(ce, golden[p + "loss_gt"])
    _close(terms["ofa_logits"], golden[p + "loss_kd"])
    _close(terms["ofa"], golden[p + "loss_ofa"])
    for i in stages:
        _close(heads[i], golden[f"{p}head{i}"])
    w = {"ce": 1.0, **OFA.weights_for()}
    (w["ce"] * ce + sum(w[k] * v for k, v in terms.items())).backward()
    _close(zs.grad, golden[p + "zs_grad"])
    for i in stages:
        _close(feats[i].grad, golden[f"{p}feat{i}_grad"])
    params = list(m.branches.parameters())
    assert len(params) == len(golden[p + "param_names"])
    for j, param in enumerate(params):
        _close(param.grad, golden[f"{p}param{j:03d}_grad"])


def test_defaults_are_the_authors_cifar100_command():
    m = OFA(
        _ctx({"stages": [(4, 8, 8), (8, 4, 4), (16, 2, 2), (32, 1, 1)], "pooled": (32,)}, {"pooled": (64,)})
    )
    assert m.eps == [1.0] * 4 and m.T == 1.0 and m.stages == [1, 2, 3]  # every stage after the stem
    assert OFA.weights_for() == {"ce": 1.0, "ofa_logits": 1.0, "ofa": 1.0}
    assert OFA.taps.teacher == ("logits", "pooled")  # the teacher only contributes logits and its width


def test_bad_eps_or_stage_is_a_config_error():
    shapes = {"stages": [(4, 8, 8), (8, 4, 4), (16, 2, 2)], "pooled": (16,)}
    with pytest.raises(ConfigError, match="eps has 2 values"):
        OFA(_ctx(shapes, {"pooled": (16,)}), eps=[1.0, 1.5])
    with pytest.raises(ConfigError, match="out of range"):
        OFA(_ctx(shapes, {"pooled": (16,)}), stages=[3])
    with pytest.raises(ConfigError, match="pooled feature"):
        OFA(_ctx(shapes, {}))


# ----------------------------------------------------------------------------- projector per pair

VIT_TAPS = {"stages": ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"], "classifier": "head"}


def _vit(img: int, patch: int, dim: int = 32) -> dict:
    params = {"name": "vit_tiny_patch16_224", "img_size": img, "patch_size": patch, "embed_dim": dim}
    return {"name": "timm", "params": {**params, "depth": 4, "num_heads": 2, "taps": VIT_TAPS}}


def _probe(ref: dict, size: int, in_channels: int = 1) -> Features:
    from kdbench.engine.build import build_model
    from kdbench.features import probe_features

    torch.manual_seed(0)
    model, spec = build_model(ref, 10, in_channels)
    return probe_features(model, spec, torch.randn(2, in_channels, size, size))


def test_cnn_student_gets_conv_branches_down_to_its_last_stage():
    pytest.importorskip("timm")
    s = _probe({"name": "smallcnn", "params": {"width": 4}}, 8)  # stages 4x8x8 .. 32x1x1
    t = _probe(_vit(8, 2, dim=48), 8)
    m = OFA(_ctx(s.shapes(), t.shapes()))
    assert m.stages == [1, 2, 3]
    for branch, n_down in zip(m.branches, (2, 1, 0), strict=True):
        convs = [c for c in branch.modules() if isinstance(c, nn.Conv2d)]
        assert not any(isinstance(c, TransformerBlock) for c in branch.modules())
        assert sum(c.stride == (2, 2) for c in convs) == n_down
        assert branch[-1].in_features == 48 == max(32, 48)  # the wider of student and teacher
    assert "stage 1 8x4x4: conv: 2 sep-conv /2 -> 48" in m.describe()
    assert "stage 3 32x1x1: conv: 1x1 conv -> 48" in m.describe()
    assert m.summary() == {"ofa_branches": m.plan}
    # the branches project features into the logit space and train with the student
    terms = m(s, t, _batch(torch.tensor([1, 2])))
    terms["ofa"].backward()
    assert all(p.grad is not None for p in m.branches.parameters())


@pytest.mark.parametrize("img,patch,merges", [(8, 2, 0), (32, 2, 1)])
def test_vit_student_gets_token_branches_with_its_class_token(img, patch, merges):
    pytest.importorskip("timm")
    s = _probe(_vit(img, patch), img)
    t = _probe({"name": "smallcnn", "params": {"width": 8}}, img)
    m = OFA(_ctx(s.shapes(), t.shapes()))
    grid = img // patch
    assert m.stages == [1, 2, 3, 4] and s.shapes()["stages"][1] == (1 + grid * grid, 32)
    for branch, blocks in zip(m.branches, (3, 2, 1, 1), strict=True):
        assert isinstance(branch, TokenBranch) and branch.prefix == 1
        assert len(branch.merge) == merges and all(isinstance(b, PatchMerge) for b in branch.merge)
        assert len(branch.blocks) == blocks and branch.fc.in_features == 32
        assert not any(isinstance(c, nn.Conv2d) for c in branch.modules())
    assert (
        f"class token + {grid}x{grid} grid, {merges} merge(s) -> 32, 3 block(s), class token" in m.describe()
    )
    assert m.branches[0](torch.randn(3, *s.shapes()["stages"][1])).shape == (3, 10)


def test_token_student_without_class_token_reads_the_mean_token():
    shapes = {"stages": [(256, 8), (256, 8), (64, 16), (16, 16)], "pooled": (16,)}
    m = OFA(_ctx(shapes, {"pooled": (24,)}))
    first = m.branches[0]
    assert first.prefix == 0 and len(first.merge) == 1  # 16x16 -> 8x8 (⌊log2(16/7)⌋ = 1)
    assert "16x16 grid, 1 merge(s) -> 16, 2 block(s), mean token" in m.describe()
    x = torch.randn(2, 256, 8)
    perm = torch.randperm(64)
    # mean readout after permutation-equivariant blocks: permuting merged tokens changes nothing
    merged = first.merge(x)
    out = first.fc(first.blocks(merged).mean(1))
    out_perm = first.fc(first.blocks(merged[:, perm]).mean(1))
    torch.testing.assert_close(out, out_perm)
    torch.testing.assert_close(first(x), out)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_heterogeneous_grid_finishes_with_every_cell_done(tmp_path):
    pytest.importorskip("timm")
    from tests.conftest import kdbench_cli, write_grid

    vit = json.dumps(_vit(8, 2)["params"])
    grid = write_grid(
        tmp_path / "het.yaml",
        f"""
name: het
output: {tmp_path / "runs"}
datasets:
  - {{digits: {{limit: 200}}}}
pairs:
  - {{teacher: {{timm: {vit}}}, student: {{smallcnn: {{width: 4}}}}}}
  - {{teacher: {{smallcnn: {{width: 8}}}}, student: {{timm: {vit}}}}}
methods: [ofa]
seeds: [0]
train: {{epochs: 1, batch_size: 64, lr: 0.01, views: {{}}}}
teacher_train: {{epochs: 1, batch_size: 64, lr: 0.01, views: {{}}}}
eval: {{batch_size: 500}}
""",
    )
    dry = kdbench_cli("run", str(grid), "--dry-run")  # OFA is built for both pairs before anything trains
    assert dry.returncode == 0 and "cannot run" not in dry.stderr, dry.stderr[-3000:]
    r = kdbench_cli("run", str(grid))
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in (tmp_path / "runs" / "het").glob("cells/*/result.json")]
    assert len(results) == 2 and all(x["status"] == "done" for x in results)
    db = sqlite3.connect(tmp_path / "runs" / "het" / "results.sqlite")
    assert db.execute("SELECT status FROM cells").fetchall() == [("done",), ("done",)]
    text = json.dumps(results)
    assert "conv: 2 sep-conv /2" in text and "class token + 4x4 grid" in text


def test_dry_run_plan_names_each_pairs_projectors():
    """The projector OFA builds per stage depends on the pair: the plan (and --dry-run) says which."""
    from kdbench.config import load_grid
    from kdbench.runner import plan
    from tests.conftest import ROOT

    p = plan(load_grid(ROOT / "examples" / "heterogeneous.yaml", ["methods=[kd, ofa]", "seeds=[0]"]))
    built = {(c.method.name, c.student.label.split("(")[0]): p.built.get(c.id) for c in p.cells}
    assert built[("kd", "resnet20")] is None  # kd builds nothing to describe
    cnn, vit = built[("ofa", "resnet20")], built[("ofa", "timm:vit_tiny_patch16_224")]
    assert cnn.startswith("stage 1 ") and "conv:" in cnn and "tokens:" not in cnn
    assert "tokens:" in vit and "conv:" not in vit
