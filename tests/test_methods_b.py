"""Golden-value and gradient tests of VID, AB, FT, FSP, CRD, ReviewKD, SemCKD, SRRL, SimKD and CKA-KD.

Every ``ref_*`` function is an independent eager re-implementation of the reference formula
(its source is cited next to it). Learned sub-networks (regressors, connectors, ...) are
taken from the method under test; what is re-implemented is the loss and the data flow.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, MethodContext

B, K = 8, 10
S_CH, S_HW = (4, 4, 6, 8), (8, 8, 4, 2)
T_CH, T_HW = (4, 8, 12, 16), (8, 8, 4, 4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _feats(seed: int, ch=S_CH, hw=S_HW, dim: int = 8, n: int = B, preact: bool = False) -> Features:
    stages = [_randn(n, c, h, h, seed=seed + 10 + i) for i, (c, h) in enumerate(zip(ch, hw, strict=True))]
    return Features(
        logits=_randn(n, K, seed=seed) * 3,
        stages=stages,
        preact=[_randn(n, c, h, h, seed=seed + 30 + i) for i, (c, h) in enumerate(zip(ch, hw, strict=True))]
        if preact
        else [],
        pooled=_randn(n, dim, seed=seed + 20),
    )


def _ctx(s: Features, t: Features, **kw) -> MethodContext:
    args = dict(
        num_classes=K,
        num_train=50,
        epochs=240,
        batch_size=s.stages[0].shape[0],
        student_shapes=s.shapes(),
        teacher_shapes=t.shapes(),
    )
    args.update(kw)
    return MethodContext(**args)


def _batch(n: int = B, epoch: int = 30) -> Batch:
    y = torch.randint(0, K, (n,), generator=_gen(5))
    return Batch(x=torch.zeros(n, 3, 4, 4), y=y, index=torch.arange(n), epoch=epoch, epochs=240)


def _leaf(f: Features) -> Features:
    return Features(
        logits=f.logits.clone().requires_grad_(),
        stages=[x.clone().requires_grad_() for x in f.stages],
        preact=[x.clone().requires_grad_() for x in f.preact],
        pooled=f.pooled.clone().requires_grad_(),
    )


def _check_grads(method, s: Features, loss: torch.Tensor, used: str) -> None:
    """Gradients reach the student's ``used`` features and every trainable method parameter."""
    loss.backward()
    grads = {
        "stages": [x.grad for x in s.stages],
        "preact": [x.grad for x in s.preact],
        "pooled": [s.pooled.grad],
    }
    assert any(g is not None and g.abs().sum() > 0 for g in grads[used]), (
        f"no gradient reached student {used}"
    )
    for g in grads[used]:
        assert g is None or torch.isfinite(g).all()
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def ref_kd(zs, zt, T):
    # HobbitLong/RepDistiller distiller_zoo/KD.py
    return F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt / T, 1), reduction="sum") * T**2 / zs.shape[0]


def ref_pool(a, b):
    # RepDistiller: pool the larger (by height) map to the smaller's size
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, (b.shape[2], b.shape[2]))
    elif a.shape[2] < b.shape[2]:
        b = F.adaptive_avg_pool2d(b, (a.shape[2], a.shape[2]))
    return a, b


# ----------------------------------------------------------------------------- vid


def ref_vid(g_s, g_t, convs, log_scales, eps=1e-5):
    # HobbitLong/RepDistiller distiller_zoo/VID.py VIDLoss.forward, summed over feat[1:-1]
    total = 0.0
    for x, y, (w1, w2, w3), ls in zip(g_s, g_t, convs, log_scales, strict=True):
        x, y = ref_pool(x, y)
        h = F.relu(torch.einsum("oc,bchw->bohw", w1, x))
        h = F.relu(torch.einsum("oc,bchw->bohw", w2, h))
        mu = torch.einsum("oc,bchw->bohw", w3, h)
        var = (torch.log(1.0 + torch.exp(ls)) + eps).view(1, -1, 1, 1)
        total = total + torch.mean(0.5 * ((mu - y) ** 2 / var + torch.log(var)))
    return total


def test_vid_golden_init_and_grads():
    from kdbench.methods.vid import VID

    s, t = _feats(1), _feats(2, T_CH, T_HW)
    m = VID(_ctx(s, t)).double()
    assert VID.default_weights == {"ce": 1.0, "vid": 1.0}
    sp = F.softplus(m.regressors[0].log_scale)
    torch.testing.assert_close(sp + 1e-5, torch.full_like(sp, 5.0))  # init_pred_var
    convs = [[r.mean[i].weight[:, :, 0, 0] for i in (0, 2, 4)] for r in m.regressors]
    ref = ref_vid(s.stages[1:], t.stages[1:], convs, [r.log_scale for r in m.regressors])
    torch.testing.assert_close(m(s, t, _batch())["vid"], ref, rtol=1e-10, atol=1e-12)
    sl = _leaf(s)
    _check_grads(m, sl, m(sl, t, _batch())["vid"], "stages")


def test_vid_regressor_gradcheck():
    from kdbench.methods.vid import VIDRegressor

    reg = VIDRegressor(2, 3, 3, 5.0, 1e-5).double()
    x, y = _randn(2, 2, 2, 2, seed=1).requires_grad_(), _randn(2, 3, 2, 2, seed=2)
    assert gradcheck(lambda a: reg(a, y), (x,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- ab


def ref_ab(g_s, g_t, margin=1.0):
    # HobbitLong/RepDistiller distiller_zoo/AB.py ABLoss; helper/pretrain.py sums the terms
    n = len(g_s)
    w = [2 ** (i - n + 1) for i in range(n)]
    bsz = g_s[0].shape[0]
    losses = []
    for source, target in zip(g_s, g_t, strict=True):
        loss = (source + margin) ** 2 * ((source > -margin) & (target <= 0)).float() + (
            source - margin
        ) ** 2 * ((source <= margin) & (target > 0)).float()
        losses.append(torch.abs(loss).sum())
    return sum(wi * li / bsz / 1000 * 3 for wi, li in zip(w, losses, strict=True))


def test_ab_init_stage_golden_and_parameters():
    from kdbench.methods._util import ConvReg
    from kdbench.methods.ab import AB

    # student stage 1 matches the teacher's shape -> identity connector; others -> ConvReg
    s = _feats(1, (4, 8, 6, 8), S_HW, preact=True)
    t = _feats(2, T_CH, T_HW, preact=True)
    m = AB(_ctx(s, t)).double()
    assert m.init_epochs == 30 and AB(_ctx(s, t), init_epochs=5).init_epochs == 5
    assert AB.default_weights == {"ce": 1.0, "kd": 0.0, "ab": 1.0}
    assert isinstance(m.connectors[0], nn.Identity)
    assert all(isinstance(c, ConvReg) and not c.use_relu for c in m.connectors[1:])
    assert m.stage_weights == [0.25, 0.5, 1.0]
    g_s = [c(x) for c, x in zip(m.connectors, s.preact[1:], strict=True)]
    ref = ref_ab(g_s, t.preact[1:])
    torch.testing.assert_close(m.init_loss(s, t, _batch())["ab"], ref, rtol=1e-10, atol=1e-12)
    # a model exposing no stem pre-activation: same result
    s2, t2 = Features(stages=s.stages, preact=s.preact[1:]), Features(stages=t.stages, preact=t.preact[1:])
    torch.testing.assert_close(m.init_loss(s2, t2, _batch())["ab"], ref, rtol=1e-10, atol=1e-12)

    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(K))
    ids = {id(p) for p in m.init_parameters(student)}
    assert {id(p) for p in student.parameters()} <= ids
    assert {id(p) for p in m.connectors.parameters()} <= ids
    sl = _leaf(s)
    _check_grads(m, sl, m.init_loss(sl, t, _batch())["ab"], "preact")


def test_ab_distillation_stage_is_kd_and_boundary_gradcheck():
    from kdbench.methods.ab import AB, ab_boundary_loss

    s, t = _feats(1, preact=True), _feats(2, T_CH, T_HW, preact=True)
    m = AB(_ctx(s, t)).double()
    out = m(s, t, _batch())
    assert set(out) == {"kd"}
    torch.testing.assert_close(out["kd"], ref_kd(s.logits, t.logits, 4.0), rtol=1e-10, atol=1e-12)
    x, y = _randn(2, 3, 2, 2, seed=3).requires_grad_(), _randn(2, 3, 2, 2, seed=4)
    assert gradcheck(lambda a: ab_boundary_loss(a, y, 1.0), (x,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- ft


def ref_ft(factor_s, factor_t, p1=2, p2=1):
    # HobbitLong/RepDistiller distiller_zoo/FT.py FactorTransfer.factor_loss
    factor_s, factor_t = ref_pool(factor_s, factor_t)

    def factor(f):
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))

    return (factor(factor_s) - factor(factor_t)).abs().mean()


def test_ft_init_stage_freeze_and_golden():
    from kdbench.methods.ft import FT

    s, t = _feats(1), _feats(2, T_CH, T_HW)
    m = FT(_ctx(s, t)).double()
    assert FT.default_weights == {"ce": 1.0, "ft": 200.0, "ft_init": 1.0} and m.init_epochs == 30
    assert m.paraphraser_enc[-3].out_channels == 8  # k = 0.5 of the teacher's 16 channels
    assert isinstance(m.translator[1], nn.BatchNorm2d) and not any(
        isinstance(x, nn.BatchNorm2d) for x in m.paraphraser_enc
    )
    # init stage: MSE reconstruction of the teacher's last stage; only the paraphraser trains
    f_t = t.stages[-1]
    ref_init = F.mse_loss(m.paraphraser_dec(m.paraphraser_enc(f_t)), f_t)
    init = m.init_loss(s, t, _batch())["ft_init"]
    torch.testing.assert_close(init, ref_init, rtol=1e-10, atol=1e-12)
    para = {id(p) for p in [*m.paraphraser_enc.parameters(), *m.paraphraser_dec.parameters()]}
    assert {id(p) for p in m.init_parameters(nn.Linear(2, 2))} == para
    init.backward()  # leaves grads on the paraphraser, which the freeze must clear
    # distillation stage: the engine announces it before the first step
    assert not m.frozen
    m.begin_stage("train")
    ref = ref_ft(m.translator(s.stages[-1]), m.paraphraser_enc(f_t).detach())
    sl = _leaf(s)
    out = m(sl, t, _batch())["ft"]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert m.frozen
    for p in [*m.paraphraser_enc.parameters(), *m.paraphraser_dec.parameters()]:
        assert not p.requires_grad and p.grad is None
    out.backward()
    for p in [*m.paraphraser_enc.parameters(), *m.paraphraser_dec.parameters()]:
        assert p.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.translator.parameters())
    assert sl.stages[-1].grad is not None and sl.stages[-1].grad.abs().sum() > 0
    m.train()
    assert not m.paraphraser_enc.training and m.translator.training


def test_ft_factor_gradcheck():
    from kdbench.methods.ft import FT

    s, t = _feats(1, hw=(8, 8, 4, 2)), _feats(2, T_CH, T_HW)
    m = FT(_ctx(s, t))
    f_t = _randn(2, 3, 2, 2, seed=9)

    def loss(a):
        return (m.factor(a) - m.factor(f_t)).abs().mean()

    assert gradcheck(loss, (_randn(2, 3, 2, 2, seed=8).requires_grad_(),), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- fsp


def ref_fsp(g_s, g_t):
    # HobbitLong/RepDistiller distiller_zoo/FSP.py compute_fsp / compute_loss, summed in helper/pretrain.py
    def compute_fsp(g):
        out = []
        for i in range(len(g) - 1):
            bot, top = ref_pool(g[i], g[i + 1])
            bot = bot.unsqueeze(1)
            top = top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
            out.append((bot * top).mean(-1))
        return out

    return sum((a - b).pow(2).mean() for a, b in zip(compute_fsp(g_s), compute_fsp(g_t), strict=True))


def test_fsp_init_golden_gradcheck_and_stage():
    from kdbench.methods.fsp import FSP

    s, t = _feats(1, T_CH, S_HW), _feats(2, T_CH, T_HW)
    m = FSP(_ctx(s, t))
    assert FSP.default_weights == {"ce": 1.0, "fsp": 1.0} and m.init_epochs == 30
    torch.testing.assert_close(
        m.init_loss(s, t, _batch())["fsp"], ref_fsp(s.stages, t.stages), rtol=1e-10, atol=1e-12
    )
    assert m(s, t, _batch()) == {}
    student = nn.Linear(2, 2)
    assert [id(p) for p in m.init_parameters(student)] == [id(p) for p in student.parameters()]

    small = [_randn(2, c, h, h, seed=40 + i) for i, (c, h) in enumerate([(2, 4), (3, 2), (2, 2)])]
    tgt = [_randn(2, c, h, h, seed=50 + i) for i, (c, h) in enumerate([(2, 4), (3, 4), (2, 2)])]

    def loss(*xs):
        return m.init_loss(Features(stages=list(xs)), Features(stages=tgt), _batch())["fsp"]

    assert gradcheck(loss, tuple(x.clone().requires_grad_() for x in small), eps=1e-6, atol=1e-6)


def test_fsp_incompatible_channels_raise_config_error():
    from kdbench.methods.fsp import FSP

    s, t = _feats(1), _feats(2, T_CH, T_HW)
    with pytest.raises(ConfigError, match=r"\(8, 2, 2\).*\(16, 4, 4\)"):
        FSP(_ctx(s, t))


# ----------------------------------------------------------------------------- crd


def ref_crd(v1, v2, mem1, mem2, y, idx, T, momentum, z1=-1.0, z2=-1.0):
    # HobbitLong/RepDistiller crd/memory.py ContrastMemory.forward + crd/criterion.py ContrastLoss
    eps = 1e-7
    bsz, dim = v1.shape
    n_data = mem1.shape[0]
    kk = idx.shape[1] - 1
    w1 = torch.index_select(mem1, 0, idx.view(-1)).view(bsz, kk + 1, dim)
    out_v2 = torch.exp(torch.bmm(w1, v2.view(bsz, dim, 1)) / T)
    w2 = torch.index_select(mem2, 0, idx.view(-1)).view(bsz, kk + 1, dim)
    out_v1 = torch.exp(torch.bmm(w2, v1.view(bsz, dim, 1)) / T)
    z1 = out_v1.mean().item() * n_data if z1 < 0 else z1
    z2 = out_v2.mean().item() * n_data if z2 < 0 else z2
    out_v1, out_v2 = out_v1 / z1, out_v2 / z2

    def contrast_loss(x):
        m = x.size(1) - 1
        pn = 1 / float(n_data)
        p_pos = x.select(1, 0)
        log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / x.shape[0]

    loss = contrast_loss(out_v1) + contrast_loss(out_v2)
    new1, new2 = mem1.clone(), mem2.clone()
    with torch.no_grad():
        for mem, v in ((new1, v1), (new2, v2)):
            pos = torch.index_select(mem, 0, y.view(-1)) * momentum + v * (1 - momentum)
            mem.index_copy_(0, y, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
    return loss.squeeze(), new1, new2, z1, z2


def _crd(seed: int = 0, targets: bool = True):
    from kdbench.methods.crd import CRD

    s, t = _feats(1, dim=8), _feats(2, dim=12)
    y = torch.arange(50) % 5
    torch.manual_seed(seed)
    m = CRD(_ctx(s, t, train_targets=y if targets else None), feat_dim=6, nce_k=16).double()
    return m, s, t, y


def test_crd_golden_memory_update_and_grads():
    m, s, t, _ = _crd()
    assert type(m).default_weights == {"ce": 1.0, "crd": 0.8}
    idx = torch.arange(B)
    contrast_idx = torch.cat([idx[:, None], (idx[:, None] * 7 + torch.arange(1, 17)[None]) % 50], 1)
    e_s = F.normalize(m.embed_s(s.pooled))
    e_t = F.normalize(m.embed_t(t.pooled))
    mem_s, mem_t = m.memory_s.clone(), m.memory_t.clone()
    loss = m.contrast(e_s, e_t, idx, contrast_idx)
    ref, new_s, new_t, z1, z2 = ref_crd(e_s, e_t, mem_s, mem_t, idx, contrast_idx, 0.07, 0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.memory_s, new_s)
    torch.testing.assert_close(m.memory_t, new_t)
    torch.testing.assert_close(m.z, torch.tensor([z1, z2], dtype=m.z.dtype))
    # second call keeps Z (set once, on the first batch)
    mem_s, mem_t = m.memory_s.clone(), m.memory_t.clone()
    loss2 = m.contrast(e_s, e_t, idx, contrast_idx)
    ref2, *_ = ref_crd(e_s, e_t, mem_s, mem_t, idx, contrast_idx, 0.07, 0.5, z1, z2)
    torch.testing.assert_close(loss2, ref2, rtol=1e-10, atol=1e-10)
    sl = _leaf(s)
    _check_grads(m, sl, m(sl, t, _batch())["crd"], "pooled")


def test_crd_negative_sampling():
    m, _, _, y = _crd()
    assert m.nce_k == 16
    idx = torch.tensor([0, 3, 17, 49])
    for _ in range(5):
        ci = m.sample_negatives(idx)
        assert ci.shape == (4, 17) and torch.equal(ci[:, 0], idx)
        assert (y[ci[:, 1:]] != y[idx][:, None]).all()  # exact mode: negatives from other classes
    m2, *_ = _crd(targets=False)
    ci = m2.sample_negatives(idx)
    assert (ci[:, 1:] != idx[:, None]).all() and ci.max() < 50 and ci.min() >= 0
    from kdbench.methods.crd import CRD

    s = _feats(1)
    assert CRD(_ctx(s, s, num_train=10)).nce_k == 9  # clipped to N - 1


def test_crd_nce_gradcheck():
    from kdbench.methods.crd import nce_loss

    p = (_randn(3, 5, seed=1).abs() + 0.1).requires_grad_()
    assert gradcheck(lambda x: nce_loss(x, 50), (p,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- reviewkd


def ref_hcl(fstudent, fteacher):
    # megvii-research/mdistiller mdistiller/distillers/ReviewKD.py hcl_loss
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher, strict=True):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for lvl in [4, 2, 1]:
            if lvl >= h:
                continue
            cnt /= 2.0
            loss += (
                F.mse_loss(F.adaptive_avg_pool2d(fs, (lvl, lvl)), F.adaptive_avg_pool2d(ft, (lvl, lvl))) * cnt
            )
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def ref_reviewkd(m, s, t, epoch):
    # mdistiller ReviewKD.forward_train + ABF.forward (the ABF layers' convs come from the method)
    x = [*s.stages[1:], s.pooled[:, :, None, None]][::-1]
    t_levels = [*t.stages[1:], t.pooled[:, :, None, None]]
    out_shapes = [f.shape[-1] for f in t_levels][::-1]

    def abf(mod, xx, y, out_shape):
        n, _, h, w = xx.shape
        xx = mod.conv1(xx)
        if mod.att_conv is not None:
            y = F.interpolate(y, (h, h), mode="nearest")
            z = mod.att_conv(torch.cat([xx, y], dim=1))
            xx = xx * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if xx.shape[-1] != out_shape:
            xx = F.interpolate(xx, (out_shape, out_shape), mode="nearest")
        return mod.conv2(xx), xx

    out, res = abf(m.abfs[0], x[0], None, out_shapes[0])
    results = [out]
    for feat, mod, osh in zip(x[1:], m.abfs[1:], out_shapes[1:], strict=True):
        out, res = abf(mod, feat, res, osh)
        results.insert(0, out)
    return min(epoch / 20, 1.0) * ref_hcl(results, t_levels)


@pytest.mark.parametrize("epoch", [0, 9, 25])
def test_reviewkd_golden_warmup_and_grads(epoch):
    from kdbench.methods.reviewkd import ReviewKD

    s, t = _feats(1, dim=8), _feats(2, T_CH, T_HW, dim=16)
    m = ReviewKD(_ctx(s, t)).double()
    assert ReviewKD.default_weights == {"ce": 1.0, "reviewkd": 1.0}
    assert [a.att_conv is None for a in m.abfs] == [True, False, False, False]
    assert m.abfs[0].conv1[0].out_channels == 8  # mid = min(512, student pooled width)
    b = _batch(epoch=epoch)  # kdbench counts epochs from 0, mdistiller from 1
    torch.testing.assert_close(
        m(s, t, b)["reviewkd"], ref_reviewkd(m, s, t, epoch + 1), rtol=1e-10, atol=1e-12
    )
    if epoch == 25:
        sl = _leaf(s)
        _check_grads(m, sl, m(sl, t, b)["reviewkd"], "stages")
        assert sl.pooled.grad is not None


def test_reviewkd_hcl_gradcheck():
    from kdbench.methods.reviewkd import hcl_loss

    a, b = _randn(1, 2, 5, 5, seed=1).requires_grad_(), _randn(1, 2, 5, 5, seed=2)
    assert gradcheck(lambda x: hcl_loss([x], [b]), (a,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- semckd


def ref_semckd(m, feat_s, feat_t):
    # DefangChen/SemCKD models/util.py SelfA.forward + distiller_zoo/SemCKD.py SemCKDLoss
    bsz = feat_s[0].shape[0]
    sim_s = [f.reshape(bsz, -1) @ f.reshape(bsz, -1).t() for f in feat_s]
    sim_t = [f.reshape(bsz, -1) @ f.reshape(bsz, -1).t() for f in feat_t]

    def mlp_embed(seq, x):
        x = seq[2](F.relu(seq[0](x)))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)

    proj_query = torch.stack([mlp_embed(q, g) for q, g in zip(m.query, sim_s, strict=True)], 1)
    proj_key = torch.stack([mlp_embed(k, g) for k, g in zip(m.key, sim_t, strict=True)], 2)
    attention = F.softmax(torch.bmm(proj_query, proj_key) / 1.0, dim=-1)
    num_stu, num_tea = len(feat_s), len(feat_t)
    ind_loss = torch.zeros(bsz, num_stu, num_tea, dtype=feat_s[0].dtype)
    for i in range(num_stu):
        for j in range(num_tea):
            source, target = ref_pool(feat_s[i], feat_t[j])
            value = m.proj[i][j](source)
            ind_loss[:, i, j] = F.mse_loss(value, target, reduction="none").reshape(bsz, -1).mean(-1)
    return (attention * ind_loss).sum() / (1.0 * bsz * num_stu)


def test_semckd_golden_small_batch_and_grads():
    from kdbench.methods.semckd import SemCKD

    s, t = _feats(1), _feats(2, T_CH, T_HW)
    m = SemCKD(_ctx(s, t)).double()
    assert SemCKD.default_weights == {"ce": 1.0, "kd": 1.0, "semckd": 400.0}
    assert m.query[0][0].in_features == B and m.query[0][2].out_features == B // 4
    out = m(s, t, _batch())
    torch.testing.assert_close(
        out["semckd"], ref_semckd(m, s.stages[1:], t.stages[1:]), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(out["kd"], ref_kd(s.logits, t.logits, 4.0), rtol=1e-10, atol=1e-12)
    att = m.attention(s.stages[1:], t.stages[1:])
    torch.testing.assert_close(att.sum(-1), torch.ones(B, 3, dtype=att.dtype))
    # a smaller last batch still works (Gram rows zero-padded to ctx.batch_size)
    s5, t5 = _feats(1, n=5), _feats(2, T_CH, T_HW, n=5)
    assert torch.isfinite(m(s5, t5, _batch(5))["semckd"])
    with pytest.raises(ConfigError, match="at most 8"):
        m(_feats(1, n=9), _feats(2, T_CH, T_HW, n=9), _batch(9))
    sl = _leaf(s)
    _check_grads(m, sl, m(sl, t, _batch())["semckd"], "stages")


# ----------------------------------------------------------------------------- srrl / simkd


def _teacher_fc(d_t: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_t, K).double().requires_grad_(False)


def test_srrl_golden_and_frozen_teacher_classifier():
    from kdbench.methods.srrl import SRRL

    s, t = _feats(1, dim=8), _feats(2, T_CH, T_HW, dim=12)
    fc = _teacher_fc(12)
    m = SRRL(_ctx(s, t, teacher_classifier=fc)).double()
    assert SRRL.default_weights == {"ce": 1.0, "kd": 1.0, "srrl": 1.0}
    assert not any(p is fc.weight or p is fc.bias for p in m.parameters())
    # DefangChen/SimKD models/util.py SRRL + helper/loops.py: mse(trans, f_t) + mse(cls_t(trans), logit_t)
    lin, bn = m.transfer[0], m.transfer[1]
    trans = F.relu(bn(torch.einsum("oc,bc->bo", lin.weight, s.pooled)))
    ref = F.mse_loss(trans, t.pooled) + F.mse_loss(trans @ fc.weight.T + fc.bias, t.logits)
    out = m(s, t, _batch())
    torch.testing.assert_close(out["srrl"], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["kd"], ref_kd(s.logits, t.logits, 4.0), rtol=1e-10, atol=1e-12)
    sl = _leaf(s)
    _check_grads(m, sl, m(sl, t, _batch())["srrl"], "pooled")
    assert fc.weight.grad is None and fc.bias.grad is None


def test_simkd_golden_predict_with_teacher_classifier():
    from kdbench.methods.simkd import SimKD

    s, t = _feats(1), _feats(2, T_CH, T_HW)
    fc = _teacher_fc(16)
    m = SimKD(_ctx(s, t, teacher_classifier=fc)).double()
    assert SimKD.default_weights == {"ce": 0.0, "simkd": 1.0}
    assert m.projector[0].out_channels == 8  # t_n // factor
    assert not any(p is fc.weight or p is fc.bias for p in m.parameters())
    # DefangChen/SimKD models/util.py SimKD.forward: student 2x2, teacher 4x4 -> teacher pooled to 2x2
    source, target = ref_pool(s.stages[-1], t.stages[-1])
    trans = m.projector(source)
    ref_logits = fc(F.adaptive_avg_pool2d(trans, (1, 1)).view(B, -1))
    ref = F.mse_loss(trans, target)
    sl = _leaf(s)
    torch.testing.assert_close(m(sl, t, _batch())["simkd"], ref, rtol=1e-10, atol=1e-12)
    logits = m.predict(sl)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    assert m.project(sl) is m.project(sl)  # the projection is computed once per student forward
    (F.cross_entropy(logits, _batch().y) + m(sl, t, _batch())["simkd"]).backward()
    assert fc.weight.grad is None and fc.bias.grad is None
    assert sl.stages[-1].grad is not None and sl.stages[-1].grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_simkd_pools_larger_student_map_and_needs_classifier():
    from kdbench.methods.simkd import SimKD

    s, t = _feats(1, hw=(8, 8, 4, 4)), _feats(2, T_CH, (8, 8, 4, 2))
    m = SimKD(_ctx(s, t, teacher_classifier=_teacher_fc(16))).double()
    assert m.predict(s).shape == (B, K) and m(s, t, _batch())["simkd"].ndim == 0
    with pytest.raises(ConfigError, match="teacher_classifier"):
        SimKD(_ctx(s, t))


# ----------------------------------------------------------------------------- ckakd


def ref_linear_cka(x, y):
    # Kornblith et al. 2019, linear CKA: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features
    x = x.flatten(1) - x.flatten(1).mean(0)
    y = y.flatten(1) - y.flatten(1).mean(0)
    return (y.T @ x).pow(2).sum() / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt())


def _block_probe(blocks: list[int], n: int = 64, d: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Layers that are orthogonal rotations of one base per block (CKA 1 within, ~0 across)."""
    g = _gen(seed)
    layers = []
    for size in blocks:
        base = torch.randn(n, d, generator=g, dtype=torch.float64)
        for _ in range(size):
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            layers.append((base @ q).view(n, 2, 2, 2) * (1 + torch.rand(1, generator=g, dtype=torch.float64)))
    return layers


def test_ckakd_recovers_obvious_teacher_blocks():
    from kdbench.methods.ckakd import CKAKD

    t_layers = _block_probe([2, 3, 1])
    t = Features(stages=t_layers)
    s = Features(stages=[_randn(64, 2, 2, 2, seed=i) for i in range(4)])
    m = CKAKD(_ctx(s, t, teacher_probe=t))
    assert m.teacher_groups == [[0, 1], [2, 3, 4], [5]]
    assert m.student_groups == [[0, 1], [2], [3]]
    summ = m.summary()
    assert summ["teacher_groups"] == m.teacher_groups and summ["student_groups"] == m.student_groups
    assert len(summ["teacher_cka"]) == 6 and abs(summ["teacher_cka"][2][4] - 1) < 1e-9
    m2 = CKAKD(_ctx(s, t, teacher_probe=t), n_groups=2)
    assert m2.teacher_groups in ([[0, 1], [2, 3, 4, 5]], [[0, 1, 2, 3, 4], [5]])
    assert CKAKD(_ctx(s, t), grouping="even").teacher_groups == [[0, 1], [2, 3], [4, 5]]


def test_ckakd_grouping_is_contiguous_covering_and_optimal():
    from kdbench.methods.ckakd import cka_groups

    def cost(groups, d):
        return sum(float(d[g][:, g].triu(1).sum()) / len(g) for g in groups)

    for seed in range(4):
        a = torch.rand(6, 6, generator=_gen(seed), dtype=torch.float64)
        c = (a + a.T) / 2
        c.fill_diagonal_(1.0)
        for n in range(1, 7):
            groups = cka_groups(c, n)
            assert len(groups) == n and all(groups) and sum(groups, []) == list(range(6))
            best = min(
                cost([list(range(i, j)) for i, j in zip((0, *cuts), (*cuts, 6), strict=True)], 1 - c)
                for cuts in itertools.combinations(range(1, 6), n - 1)
            )
            assert math.isclose(cost(groups, 1 - c), best, rel_tol=1e-9, abs_tol=1e-12)


def test_ckakd_golden_gradcheck_and_errors():
    from kdbench.methods.ckakd import CKAKD

    s, t = _feats(1), _feats(2, T_CH, T_HW)
    m = CKAKD(_ctx(s, t, teacher_probe=t), weights=[1.0, 2.0, 0.5])
    assert CKAKD.default_weights == {"ce": 1.0, "ckakd": 1.0}
    kmat = torch.stack([torch.stack([ref_linear_cka(a, b) for b in t.stages]) for a in s.stages])
    ref = sum(
        w * (1 - kmat[gs][:, gt].mean())
        for w, gs, gt in zip([1.0, 2.0, 0.5], m.student_groups, m.teacher_groups, strict=True)
    )
    torch.testing.assert_close(m(s, t, _batch())["ckakd"], ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        torch.tensor(m.summary()["teacher_cka"], dtype=torch.float64),
        torch.stack([torch.stack([ref_linear_cka(a, b) for b in t.stages]) for a in t.stages]),
    )

    small_t = Features(stages=[_randn(5, 2, 1, 2, seed=60 + i) for i in range(3)])
    small_s = [_randn(5, 2, 1, 2, seed=70 + i) for i in range(3)]
    for unbiased in (False, True):
        mm = CKAKD(
            _ctx(Features(stages=small_s), small_t, teacher_probe=small_t), n_groups=2, unbiased=unbiased
        )

        def loss(*xs, mm=mm):
            return mm(Features(stages=list(xs)), small_t, _batch(5))["ckakd"]

        assert gradcheck(loss, tuple(x.clone().requires_grad_() for x in small_s), eps=1e-6, atol=1e-6)

    # a last batch of 3 samples: the unbiased estimator falls back to the biased one
    three = Features(stages=[x[:3] for x in small_s])
    assert torch.isfinite(mm(three, Features(stages=[x[:3] for x in small_t.stages]), _batch(3))["ckakd"])

    with pytest.raises(ConfigError, match="weights has 2 entries"):
        CKAKD(_ctx(s, t, teacher_probe=t), weights=[1.0, 1.0])
    with pytest.raises(ConfigError, match="probe"):
        CKAKD(_ctx(s, t))
    assert len(CKAKD(_ctx(s, t, teacher_probe=t), n_groups=9).teacher_groups) == 4
