"""Per-block taps (``blocks``) of the zoo's models, and ckakd relating every block by default."""

from __future__ import annotations

import logging

import pytest
import torch

from kdbench.errors import ConfigError
from kdbench.features import FeatureReader, Features, TapSpec
from kdbench.methods.base import Batch, MethodContext
from kdbench.methods.ckakd import CKAKD
from kdbench.models.mobilenetv2 import mobilenetv2
from kdbench.models.resnet_cifar import resnet20, resnet56
from kdbench.models.wrn import wrn_16_2


def _probe(model: torch.nn.Module, x: torch.Tensor, wanted=("logits", "stages", "blocks")) -> Features:
    reader = FeatureReader(model, model.kd_taps, list(wanted))
    model.eval()
    with torch.no_grad():
        f = reader.read(x).detach()
    reader.close()
    return f


def _ctx(s: Features, t: Features) -> MethodContext:
    return MethodContext(
        num_classes=10, num_train=100, epochs=1, batch_size=8,
        student_shapes=s.shapes(), teacher_shapes=t.shapes(), student_probe=s, teacher_probe=t,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    return resnet20(num_classes=10), resnet56(num_classes=10), x


def test_blocks_are_every_residual_block_in_order(pair):
    s, t, x = pair
    assert s.kd_taps.blocks == ("relu", *(f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)))
    f = _probe(t, x)
    assert len(f.blocks) == 1 + 27 and len(f.stages) == 4
    # each stage output is its last block's output; the stem is the first block
    for stage, block in zip(f.stages, (f.blocks[0], f.blocks[9], f.blocks[18], f.blocks[27]), strict=True):
        assert torch.equal(stage, block)
    assert f.shapes()["blocks"][-1] == (64, 8, 8)
    assert "blocks" not in _probe(t, x, ("logits", "stages")).shapes()  # only when read
    w = _probe(wrn_16_2(num_classes=10), x).blocks
    assert len(w) == 1 + 3 * 2
    assert len(_probe(mobilenetv2(num_classes=10), x).blocks) == 1 + 17 + 1


def test_a_model_without_block_taps_offers_its_stages():
    model = resnet20(num_classes=10)
    model.kd_taps = TapSpec(stages=("layer1", "layer3"), classifier="fc")
    f = _probe(model, torch.randn(2, 3, 32, 32))
    assert [b.shape[1] for b in f.blocks] == [16, 64]
    model.kd_taps = TapSpec(classifier="fc")
    with pytest.raises(ConfigError, match="no block or stage taps"):
        FeatureReader(model, model.kd_taps, ["blocks"])


def test_ckakd_relates_every_block_by_default(pair):
    s_model, t_model, x = pair
    s, t = _probe(s_model, x), _probe(t_model, x)
    m = CKAKD(_ctx(s, t))
    assert m.summary()["layers"] == "blocks"
    groups_t, groups_s = m.teacher_groups, m.student_groups
    assert [i for g in groups_t for i in g] == list(range(28)) and len(groups_t) == 3
    assert groups_s == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert len(m.teacher_cka) == 28
    old = CKAKD(_ctx(s, t), layers="stages")
    assert old.summary()["layers"] == "stages" and old.student_groups == [[0, 1], [2], [3]]
    batch = Batch(x=x, y=torch.zeros(8, dtype=torch.long), index=torch.arange(8))
    # the loss reads the blocks: changing a middle block (not a stage) changes it
    loss = m(s, t, batch)["ckakd"]
    s2 = Features(
        logits=s.logits, stages=s.stages, blocks=[*s.blocks[:5], torch.randn_like(s.blocks[5]), *s.blocks[6:]]
    )
    assert not torch.isclose(m(s2, t, batch)["ckakd"], loss)
    assert torch.equal(old(s2, t, batch)["ckakd"], old(s, t, batch)["ckakd"])


def test_ckakd_taps_and_the_stage_fallback(pair, caplog):
    s_model, t_model, x = pair
    assert "blocks" in CKAKD.taps_for().student and "blocks" in CKAKD.taps_for(n_groups=2).teacher
    assert CKAKD.taps_for(layers="stages").student == ("logits", "stages")
    # a context without block features (a probe that did not read them): the stages, loudly
    s, t = _probe(s_model, x, ("logits", "stages")), _probe(t_model, x, ("logits", "stages"))
    with caplog.at_level(logging.WARNING, logger="kdbench.methods.ckakd"):
        m = CKAKD(_ctx(s, t))
    assert m.summary()["layers"] == "stages" and "relating their stages" in caplog.text
    with pytest.raises(ConfigError, match="'blocks' or 'stages'"):
        CKAKD(_ctx(s, t), layers="convs")
