"""Golden-value and gradient tests of the logit and RepDistiller-family methods.

Every ``ref_*`` function below is an independent eager re-implementation of the reference
formula (the source is cited next to it); the methods must match it on fixed, seeded inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kdbench.features import Features
from kdbench.methods.base import Batch, MethodContext

B, C = 6, 10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _stages(seed: int, channels: tuple[int, ...], sizes: tuple[int, ...], n: int = B) -> list[torch.Tensor]:
    return [_randn(n, c, h, h, seed=seed + i) for i, (c, h) in enumerate(zip(channels, sizes, strict=True))]


def _feats(seed: int, channels=(4, 4, 6, 8), sizes=(8, 8, 4, 2), dim: int = 8, n: int = B) -> Features:
    return Features(
        logits=_randn(n, C, seed=seed) * 3,
        stages=_stages(seed + 10, channels, sizes, n),
        pooled=_randn(n, dim, seed=seed + 20),
    )


def _ctx(s: Features, t: Features, epochs: int = 240) -> MethodContext:
    return MethodContext(
        num_classes=C,
        num_train=100,
        epochs=epochs,
        batch_size=s.logits.shape[0],
        student_shapes=s.shapes(),
        teacher_shapes=t.shapes(),
    )


def _batch(n: int = B, epoch: int = 0, seed: int = 3) -> Batch:
    y = torch.randint(0, C, (n,), generator=_gen(seed))
    return Batch(x=torch.zeros(n, 3, 4, 4), y=y, index=torch.arange(n), epoch=epoch, epochs=240)


def _leaf(f: Features) -> Features:
    """A copy whose student tensors require grad."""
    return Features(
        logits=f.logits.clone().requires_grad_(),
        stages=[x.clone().requires_grad_() for x in f.stages],
        pooled=f.pooled.clone().requires_grad_(),
    )


def _assert_grads_flow(method, s: Features, t: Features, batch: Batch, used: str) -> None:
    s = _leaf(s)
    total = sum(v for v in method(s, t, batch).values())
    total.backward()
    grads = {"logits": [s.logits.grad], "stages": [x.grad for x in s.stages], "pooled": [s.pooled.grad]}[used]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reached student {used}"
    for g in grads:
        assert g is None or torch.isfinite(g).all()
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _gradcheck_logits(method, s: Features, t: Features, batch: Batch, term: str) -> None:
    def f(z: torch.Tensor) -> torch.Tensor:
        return method(Features(logits=z, stages=s.stages, pooled=s.pooled), t, batch)[term]

    assert gradcheck(f, (s.logits.clone().requires_grad_(),), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- ce


def test_ce_returns_no_terms_and_needs_no_teacher():
    from kdbench.methods.ce import CE

    s = _feats(1)
    m = CE(_ctx(s, s))
    assert CE.requires_teacher is False and CE.taps.teacher == ()
    assert m(s, Features(), _batch()) == {}
    assert CE.default_weights == {"ce": 1.0}


# ----------------------------------------------------------------------------- kd


def ref_kd(zs, zt, T):
    # HobbitLong/RepDistiller distiller_zoo/KD.py: kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B
    p_s = F.log_softmax(zs / T, dim=1)
    p_t = F.softmax(zt / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * T**2 / zs.shape[0]


@pytest.mark.parametrize("T", [4.0, 1.0])
def test_kd_golden_and_gradcheck(T):
    from kdbench.methods.kd import KD

    s, t = _feats(1), _feats(2)
    m = KD(_ctx(s, t), T=T)
    out = m(s, t, _batch())
    torch.testing.assert_close(out["kd"], ref_kd(s.logits, t.logits, T), rtol=1e-10, atol=1e-12)
    assert KD.default_weights == {"ce": 0.1, "kd": 0.9}
    _gradcheck_logits(m, s, t, _batch(), "kd")


# ----------------------------------------------------------------------------- dkd


def ref_dkd(zs, zt, y, alpha, beta, T):
    # megvii-research/mdistiller mdistiller/distillers/DKD.py dkd_loss
    gt = torch.zeros_like(zs).scatter_(1, y[:, None], 1).bool()
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)

    def cat(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], 1)

    tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction="sum") * T**2 / zs.shape[0]
    pt2 = F.softmax(zt / T - 1000.0 * gt, 1)
    ls2 = F.log_softmax(zs / T - 1000.0 * gt, 1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * T**2 / zs.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epoch", [0, 9, 19, 100])
def test_dkd_golden_with_warmup(epoch, dtype):
    from kdbench.methods.dkd import DKD

    s, t = _feats(1), _feats(2)
    zs, zt = s.logits.to(dtype), t.logits.to(dtype)
    batch = _batch(epoch=epoch)
    m = DKD(_ctx(s, t))
    got = m(Features(logits=zs), Features(logits=zt), batch)["dkd"]
    want = min((epoch + 1) / 20, 1.0) * ref_dkd(s.logits, t.logits, batch.y, 1.0, 8.0, 4.0)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert DKD.default_weights == {"ce": 1.0, "dkd": 1.0}


def test_dkd_gradcheck():
    from kdbench.methods.dkd import DKD

    s, t = _feats(1), _feats(2)
    _gradcheck_logits(DKD(_ctx(s, t), alpha=0.7, beta=3.0, T=2.0), s, t, _batch(epoch=30), "dkd")


# ----------------------------------------------------------------------------- fitnet


def ref_convreg(x, conv, bn_w, bn_b, eps=1e-5):
    # HobbitLong/RepDistiller models/util.py ConvReg: conv -> BatchNorm (train mode) -> ReLU
    y = conv(x)
    mu = y.mean((0, 2, 3), keepdim=True)
    var = y.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + eps) * bn_w[None, :, None, None] + bn_b[None, :, None, None]
    return y.clamp_min(0)


@pytest.mark.parametrize(
    "s_size,t_size,kind",
    [(4, 4, "valid"), (8, 4, "stride2"), (2, 4, "transpose"), (6, 4, "valid")],
)
def test_fitnet_golden(s_size, t_size, kind):
    from kdbench.methods.fitnet import FitNet

    s = _feats(1, channels=(4, 4, 6, 8), sizes=(8, 8, s_size, 2))
    t = _feats(2, channels=(4, 4, 5, 8), sizes=(8, 8, t_size, 2))
    torch.manual_seed(0)
    m = FitNet(_ctx(s, t)).double()
    conv = m.regressor.conv
    if kind == "stride2":
        assert conv.stride == (2, 2) and conv.kernel_size == (3, 3)

        def op(x):
            return F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
    elif kind == "transpose":
        assert isinstance(conv, torch.nn.ConvTranspose2d)

        def op(x):
            return F.conv_transpose2d(x, conv.weight, conv.bias, stride=2, padding=1)
    else:
        assert conv.kernel_size == (1 + s_size - t_size,) * 2

        def op(x):
            return F.conv2d(x, conv.weight, conv.bias)

    # RepDistiller distiller_zoo/FitNet.py HintLoss: nn.MSELoss()(regress(f_s), f_t)
    r = m.regressor
    want = ((ref_convreg(s.stages[2], op, r.bn.weight, r.bn.bias) - t.stages[2]) ** 2).mean()
    torch.testing.assert_close(m(s, t, _batch())["hint"], want, rtol=1e-9, atol=1e-12)
    assert FitNet.default_weights == {"ce": 1.0, "hint": 100.0}


def test_fitnet_gradients_and_bad_shape():
    from kdbench.errors import ConfigError
    from kdbench.methods.fitnet import FitNet

    s = _feats(1, channels=(4, 4, 6, 8), sizes=(8, 8, 8, 2))
    t = _feats(2, channels=(4, 4, 5, 8), sizes=(8, 8, 4, 2))
    m = FitNet(_ctx(s, t)).double()
    _assert_grads_flow(m, s, t, _batch(), "stages")
    small = _feats(1, sizes=(8, 8, 3, 2))
    with pytest.raises(ConfigError):
        FitNet(_ctx(small, t))


# ----------------------------------------------------------------------------- stage / pooled helpers


def _gradcheck_stages(method, s: Features, t: Features, idx: list[int], term: str) -> None:
    def f(*xs: torch.Tensor) -> torch.Tensor:
        stages = list(s.stages)
        for i, x in zip(idx, xs, strict=True):
            stages[i] = x
        return method(Features(logits=s.logits, stages=stages, pooled=s.pooled), t, _batch())[term]

    inputs = tuple(s.stages[i].clone().requires_grad_() for i in idx)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def _gradcheck_pooled(method, s: Features, t: Features, term: str) -> None:
    def f(p: torch.Tensor) -> torch.Tensor:
        return method(Features(logits=s.logits, stages=s.stages, pooled=p), t, _batch())[term]

    assert gradcheck(f, (s.pooled.clone().requires_grad_(),), eps=1e-6, atol=1e-5)


# small, mismatched shapes: stage 1 student larger, stage 2 teacher larger, stage 3 equal
S_CH, S_HW = (3, 2, 3, 4), (4, 4, 2, 2)
T_CH, T_HW = (3, 3, 2, 5), (4, 2, 4, 2)


def _small_pair(n: int = 5) -> tuple[Features, Features]:
    s = _feats(1, channels=S_CH, sizes=S_HW, dim=4, n=n)
    t = _feats(2, channels=T_CH, sizes=T_HW, dim=7, n=n)
    return s, t


def _pool_pair(fs, ft):
    # HobbitLong/RepDistiller distiller_zoo/AT.py, NST.py: pool the larger map to (H, H) of the smaller
    hs, ht = fs.shape[2], ft.shape[2]
    if hs > ht:
        fs = F.adaptive_avg_pool2d(fs, (ht, ht))
    elif hs < ht:
        ft = F.adaptive_avg_pool2d(ft, (hs, hs))
    return fs, ft


# ----------------------------------------------------------------------------- at


def ref_at(g_s, g_t, p=2):
    # HobbitLong/RepDistiller distiller_zoo/AT.py Attention.at_loss, applied to feat[1:-1]
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    out = 0
    for fs, ft in zip(g_s, g_t, strict=True):
        fs, ft = _pool_pair(fs, ft)
        out = out + (at(fs) - at(ft)).pow(2).mean()
    return out


def test_at_golden_and_gradcheck():
    from kdbench.methods.at import AT

    s, t = _small_pair()
    m = AT(_ctx(s, t))
    torch.testing.assert_close(
        m(s, t, _batch(5))["at"], ref_at(s.stages[1:], t.stages[1:]), rtol=1e-10, atol=0
    )
    assert AT.default_weights == {"ce": 1.0, "at": 1000.0}
    _gradcheck_stages(m, s, t, [1, 2, 3], "at")


# ----------------------------------------------------------------------------- nst


def ref_nst(g_s, g_t):
    # HobbitLong/RepDistiller distiller_zoo/NST.py NSTLoss (full_loss=True), applied to feat[1:-1]
    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    out = 0
    for fs, ft in zip(g_s, g_t, strict=True):
        fs, ft = _pool_pair(fs, ft)
        fs = F.normalize(fs.view(fs.shape[0], fs.shape[1], -1), dim=2)
        ft = F.normalize(ft.view(ft.shape[0], ft.shape[1], -1), dim=2)
        out = out + poly(ft, ft).mean() + poly(fs, fs).mean() - 2 * poly(fs, ft).mean()
    return out


def test_nst_golden_and_gradcheck():
    from kdbench.methods.nst import NST

    s, t = _small_pair()
    m = NST(_ctx(s, t))
    torch.testing.assert_close(
        m(s, t, _batch(5))["nst"], ref_nst(s.stages[1:], t.stages[1:]), rtol=1e-10, atol=0
    )
    assert NST.default_weights == {"ce": 1.0, "nst": 50.0}
    _gradcheck_stages(m, s, t, [1, 2, 3], "nst")


@pytest.mark.parametrize("name,cls", [("at", "AT"), ("nst", "NST")])
def test_stagewise_methods_reject_unequal_stage_counts(name, cls):
    import importlib

    from kdbench.errors import ConfigError

    s, t = _small_pair()
    t.stages = t.stages[:-1]
    with pytest.raises(ConfigError, match="stages"):
        getattr(importlib.import_module(f"kdbench.methods.{name}"), cls)(_ctx(s, t))


# ----------------------------------------------------------------------------- sp


def ref_sp(fs, ft):
    # HobbitLong/RepDistiller distiller_zoo/SP.py Similarity.similarity_loss, applied to feat[-2]
    bsz = fs.shape[0]
    fs, ft = fs.view(bsz, -1), ft.view(bsz, -1)
    gs = F.normalize(torch.mm(fs, fs.t()))
    gt = F.normalize(torch.mm(ft, ft.t()))
    d = gt - gs
    return (d * d).view(-1, 1).sum(0)[0] / (bsz * bsz)


def test_sp_golden_and_gradcheck():
    from kdbench.methods.sp import SP

    s, t = _small_pair()
    m = SP(_ctx(s, t))
    torch.testing.assert_close(
        m(s, t, _batch(5))["sp"], ref_sp(s.stages[-1], t.stages[-1]), rtol=1e-10, atol=0
    )
    assert SP.default_weights == {"ce": 1.0, "sp": 3000.0}
    _gradcheck_stages(m, s, t, [3], "sp")


# ----------------------------------------------------------------------------- cc


def test_cc_golden_and_gradients():
    from kdbench.methods.cc import CC

    s, t = _small_pair()
    m = CC(_ctx(s, t), embed_dim=3).double()
    # HobbitLong/RepDistiller distiller_zoo/CC.py Correlation on LinearEmbed outputs (train_student.py)
    e_s = s.pooled @ m.embed_s.weight.T + m.embed_s.bias
    e_t = t.pooled @ m.embed_t.weight.T + m.embed_t.bias
    delta = torch.abs(e_s - e_t)
    want = torch.mean((delta[:-1] * delta[1:]).sum(1))
    torch.testing.assert_close(m(s, t, _batch(5))["cc"], want, rtol=1e-10, atol=0)
    assert CC.default_weights == {"ce": 1.0, "cc": 0.02}
    assert CC(_ctx(s, t)).embed_s.out_features == 128
    _assert_grads_flow(m, s, t, _batch(5), "pooled")
    _gradcheck_pooled(m, s, t, "cc")


# ----------------------------------------------------------------------------- rkd


def ref_rkd(fs, ft, w_d=25.0, w_a=50.0):
    # HobbitLong/RepDistiller distiller_zoo/RKD.py RKDLoss
    def pdist(e, eps=1e-12):
        e2 = e.pow(2).sum(dim=1)
        res = (e2.unsqueeze(1) + e2.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    with torch.no_grad():
        t_d = pdist(ft)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(fs)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = F.normalize(ft.unsqueeze(0) - ft.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = F.normalize(fs.unsqueeze(0) - fs.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    return w_d * loss_d + w_a * F.smooth_l1_loss(s_angle, t_angle)


def test_rkd_golden_and_gradcheck():
    from kdbench.methods.rkd import RKD

    s, t = _small_pair()
    m = RKD(_ctx(s, t))
    torch.testing.assert_close(m(s, t, _batch(5))["rkd"], ref_rkd(s.pooled, t.pooled), rtol=1e-10, atol=0)
    assert RKD.default_weights == {"ce": 1.0, "rkd": 1.0}
    _gradcheck_pooled(m, s, t, "rkd")


# ----------------------------------------------------------------------------- pkt


def ref_pkt(out, tgt, eps=1e-7):
    # HobbitLong/RepDistiller distiller_zoo/PKT.py cosine_similarity_loss
    out = out / (torch.sqrt(torch.sum(out**2, dim=1, keepdim=True)) + eps)
    out[out != out] = 0
    tgt = tgt / (torch.sqrt(torch.sum(tgt**2, dim=1, keepdim=True)) + eps)
    tgt[tgt != tgt] = 0
    ms = (torch.mm(out, out.t()) + 1.0) / 2.0
    ts = (torch.mm(tgt, tgt.t()) + 1.0) / 2.0
    ms = ms / torch.sum(ms, dim=1, keepdim=True)
    ts = ts / torch.sum(ts, dim=1, keepdim=True)
    return torch.mean(ts * torch.log((ts + eps) / (ms + eps)))


def test_pkt_golden_and_gradcheck():
    from kdbench.methods.pkt import PKT

    s, t = _small_pair()
    m = PKT(_ctx(s, t))
    torch.testing.assert_close(m(s, t, _batch(5))["pkt"], ref_pkt(s.pooled, t.pooled), rtol=1e-10, atol=0)
    assert PKT.default_weights == {"ce": 1.0, "pkt": 30000.0}
    _gradcheck_pooled(m, s, t, "pkt")


# ----------------------------------------------------------------------------- dist


def ref_dist(zs, zt, beta, gamma, tau):
    # hunto/image_classification_sota lib/models/losses/dist_kd.py (with the tau-scaled CIFAR form)
    def cos(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson(a, b):
        return cos(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    def inter(a, b):
        return 1 - pearson(a, b).mean()

    ys, yt = (zs / tau).softmax(dim=1), (zt / tau).softmax(dim=1)
    return beta * tau**2 * inter(ys, yt) + gamma * tau**2 * inter(ys.transpose(0, 1), yt.transpose(0, 1))


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (0.5, 3.0, 2.0)])
def test_dist_golden(beta, gamma, tau):
    from kdbench.methods.dist import DIST

    s, t = _feats(1), _feats(2)
    m = DIST(_ctx(s, t), beta=beta, gamma=gamma, tau=tau)
    want = ref_dist(s.logits, t.logits, beta, gamma, tau)
    torch.testing.assert_close(m(s, t, _batch())["dist"], want, rtol=1e-10, atol=1e-14)
    assert DIST.default_weights == {"ce": 1.0, "dist": 1.0}


def test_dist_gradcheck():
    from kdbench.methods.dist import DIST

    s, t = _feats(1), _feats(2)
    _gradcheck_logits(DIST(_ctx(s, t), tau=4.0), s, t, _batch(), "dist")


# ----------------------------------------------------------------------------- lsr / tfkd


def _weighted_total(method, s, t, batch, **params):
    terms = method(s, t, batch)
    w = type(method).weights_for(**params)
    return w["ce"] * F.cross_entropy(s.logits, batch.y) + sum(w[k] * v for k, v in terms.items())


def ref_lsr(outputs, labels, alpha=0.1):
    # yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py loss_label_smoothing
    n, c = outputs.shape
    smoothed = torch.full((n, c), alpha / (c - 1), dtype=outputs.dtype)
    smoothed.scatter_(1, labels.unsqueeze(1), 1 - alpha)
    return -torch.sum(F.log_softmax(outputs, dim=1) * smoothed) / n


def test_lsr_total_matches_reference_and_gradcheck():
    from kdbench.methods.lsr import LSR

    s = _feats(1)
    m = LSR(_ctx(s, s))
    assert LSR.requires_teacher is False and LSR.taps.teacher == ()
    batch = _batch()
    torch.testing.assert_close(
        _weighted_total(m, s, Features(), batch), ref_lsr(s.logits, batch.y), rtol=1e-10, atol=0
    )
    _gradcheck_logits(m, s, Features(), batch, "smooth")


def ref_tfkd_reg(outputs, labels, alpha=0.1, T=20.0, multiplier=100.0, correct_prob=0.99):
    # yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py loss_kd_regularization
    k = outputs.size(1)
    soft = torch.ones_like(outputs) * (1 - correct_prob) / (k - 1)
    for i in range(outputs.shape[0]):
        soft[i, labels[i]] = correct_prob
    with pytest.warns(UserWarning):  # nn.KLDivLoss()'s element-wise 'mean', kept on purpose
        kl = torch.nn.KLDivLoss()(F.log_softmax(outputs, dim=1), F.softmax(soft / T, dim=1))
    return (1.0 - alpha) * F.cross_entropy(outputs, labels) + alpha * kl * multiplier


def ref_tfkd_self(outputs, labels, teacher_outputs, alpha=0.95, T=6.0, multiplier=50.0):
    # yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py loss_kd_self
    with pytest.warns(UserWarning):
        kl = torch.nn.KLDivLoss()(F.log_softmax(outputs / T, dim=1), F.softmax(teacher_outputs / T, dim=1))
    return (1.0 - alpha) * F.cross_entropy(outputs, labels) + alpha * kl * T * T * multiplier


def test_tfkd_virtual_total_matches_reference():
    from kdbench.methods.tfkd import TfKD

    s = _feats(1)
    m = TfKD(_ctx(s, s))
    assert m.mode == "virtual" and TfKD.needs_teacher() is False and TfKD.taps_for().teacher == ()
    assert TfKD.needs_teacher(mode="self") is True
    assert TfKD.weights_for() == {"ce": 0.9, "tfkd": 0.1} == TfKD.default_weights
    # the class describes the default mode; instances never shadow class variables
    assert "taps" not in vars(m) and "default_weights" not in vars(m) and "requires_teacher" not in vars(m)
    batch = _batch()
    torch.testing.assert_close(_weighted_total(m, s, Features(), batch), ref_tfkd_reg(s.logits, batch.y))
    _gradcheck_logits(m, s, Features(), batch, "tfkd")


def test_tfkd_self_total_matches_reference():
    from kdbench.errors import ConfigError
    from kdbench.methods.tfkd import TfKD

    s, t = _feats(1), _feats(2)
    m = TfKD(_ctx(s, t), mode="self")
    assert TfKD.needs_teacher(mode="self") is True and TfKD.taps_for(mode="self").teacher == ("logits",)
    assert TfKD.weights_for(mode="self") == {"ce": pytest.approx(0.05), "tfkd": 0.95}
    batch = _batch()
    want = ref_tfkd_self(s.logits, batch.y, t.logits)
    torch.testing.assert_close(_weighted_total(m, s, t, batch, mode="self"), want, rtol=1e-10, atol=0)
    want = ref_tfkd_self(s.logits, batch.y, t.logits, T=3.0, multiplier=10.0)
    m3 = TfKD(_ctx(s, t), mode="self", T=3.0, multiplier=10.0)
    torch.testing.assert_close(_weighted_total(m3, s, t, batch, mode="self"), want, rtol=1e-10, atol=0)
    _gradcheck_logits(m, s, t, batch, "tfkd")
    with pytest.raises(ConfigError):
        TfKD(_ctx(s, t), mode="teacher")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- mlkd


def ref_mlkd(zs_w, zs_s, zt_w, zt_s, y, T0=4.0, ce_w=0.1, kd_w=0.9):
    # Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py KD_ours.forward_train
    def kd(a, b, T):
        return F.kl_div(F.log_softmax(a / T, 1), F.softmax(b / T, 1), reduction="none").sum(1).mean() * T**2

    def cc(a, b, T):
        ps, pt = F.softmax(a / T, 1), F.softmax(b / T, 1)
        return ((torch.mm(pt.transpose(1, 0), pt) - torch.mm(ps.transpose(1, 0), ps)) ** 2).sum() / a.shape[1]

    def bc(a, b, T):
        ps, pt = F.softmax(a / T, 1), F.softmax(b / T, 1)
        return ((torch.mm(pt, pt.transpose(1, 0)) - torch.mm(ps, ps.transpose(1, 0))) ** 2).sum() / a.shape[0]

    pt = F.softmax(zt_w, dim=1)
    conf = pt.max(dim=1)[0]
    mask = conf.le(float(np.percentile(conf.numpy().flatten(), 50)))
    cconf = pt.sum(0)
    cmask = cconf.le(float(np.percentile(cconf.numpy().flatten(), 50)))
    temps = [T0, 3.0, 5.0, 2.0, 6.0]
    loss_ce = ce_w * (F.cross_entropy(zs_w, y) + F.cross_entropy(zs_s, y))
    kd_weak = sum(kd_w * (kd(zs_w, zt_w, T) * mask).mean() for T in temps)
    kd_strong = sum(kd_w * kd(zs_s, zt_s, T) for T in temps[:3]) + sum(
        kd_w * kd(zs_w, zt_w, T) for T in temps[3:]
    )
    cc_weak = sum(kd_w * (cc(zs_w, zt_w, T) * cmask).mean() for T in temps)
    bc_weak = sum(kd_w * (bc(zs_w, zt_w, T) * mask).mean() for T in temps)
    return loss_ce + kd_weak + kd_strong + cc_weak + bc_weak


def _mlkd_inputs():
    s_w, t_w = _feats(1, n=8), _feats(2, n=8)
    s_s, t_s = _feats(3, n=8), _feats(4, n=8)
    batch = _batch(8)
    batch.views = {"strong": (s_s, t_s)}
    return s_w, t_w, s_s, t_s, batch


def test_mlkd_total_matches_reference():
    from kdbench.methods.mlkd import MLKD

    s_w, t_w, s_s, t_s, batch = _mlkd_inputs()
    m = MLKD(_ctx(s_w, t_w))
    assert MLKD.views == ("strong",)
    want = ref_mlkd(s_w.logits, s_s.logits, t_w.logits, t_s.logits, batch.y)
    torch.testing.assert_close(_weighted_total(m, s_w, t_w, batch), want, rtol=1e-10, atol=0)


def test_mlkd_without_strong_view_uses_weak_view():
    from kdbench.methods.mlkd import MLKD

    s_w, t_w, _, _, batch = _mlkd_inputs()
    m = MLKD(_ctx(s_w, t_w))
    batch.views = {}
    want = ref_mlkd(s_w.logits, s_w.logits, t_w.logits, t_w.logits, batch.y)
    torch.testing.assert_close(_weighted_total(m, s_w, t_w, batch), want, rtol=1e-10, atol=0)


def test_mlkd_gradcheck():
    from kdbench.methods.mlkd import MLKD

    s_w, t_w, s_s, t_s, batch = _mlkd_inputs()
    m = MLKD(_ctx(s_w, t_w))

    def f(zw: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        batch.views = {"strong": (Features(logits=zs), t_s)}
        return sum(m(Features(logits=zw), t_w, batch).values())

    inputs = (s_w.logits.clone().requires_grad_(), s_s.logits.clone().requires_grad_())
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------- contract


MINE = {
    "ce": "CE",
    "kd": "KD",
    "dkd": "DKD",
    "mlkd": "MLKD",
    "dist": "DIST",
    "tfkd": "TfKD",
    "lsr": "LSR",
    "fitnet": "FitNet",
    "at": "AT",
    "sp": "SP",
    "cc": "CC",
    "rkd": "RKD",
    "pkt": "PKT",
    "nst": "NST",
}


def _as_float(f: Features) -> Features:
    return Features(logits=f.logits.float(), stages=[x.float() for x in f.stages], pooled=f.pooled.float())


@pytest.mark.parametrize("name", sorted(MINE))
def test_contract(name):
    import importlib
    import inspect

    from kdbench.methods.base import Distiller

    cls = getattr(importlib.import_module(f"kdbench.methods.{name}"), MINE[name])
    assert issubclass(cls, Distiller) and cls.__doc__ and inspect.getmodule(cls).__doc__
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    for p in params:  # a grid's params are validated against these
        assert p.annotation is not inspect.Parameter.empty and p.default is not inspect.Parameter.empty, p
    assert "ce" in cls.default_weights
    s, t = (_as_float(f) for f in _small_pair())
    m = cls(_ctx(s, t))
    batch = _batch(5)
    terms = m(s, t if m.requires_teacher else Features(), batch)
    assert set(terms) <= set(m.default_weights) and all(
        torch.isfinite(v) and v.dim() == 0 for v in terms.values()
    )
