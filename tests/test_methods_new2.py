"""Golden tests of SDD, WKD (WKD-L and WKD-F), SRD and DIST+ against the authors' code.

Each fixture in ``tests/fixtures/golden/<name>.npz`` holds fixed float64 inputs, the learnable glue
weights (classifiers, projectors) and the loss and gradients that the reference loss code produced
on them; the ``.md`` next to it names the repository, commit, file and the script that made it.
kdbench's methods must reproduce both to rel 1e-6, so a changed constant, temperature factor,
region weight or reduction fails.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from kdbench.errors import ConfigError
from kdbench.features import Features
from kdbench.methods.base import Batch, MethodContext

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
RTOL = 1e-6


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as f:
        return dict(f)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def _close(got: torch.Tensor | float, want: np.ndarray | float) -> None:
    got_t = torch.as_tensor(got, dtype=torch.float64).detach()
    torch.testing.assert_close(got_t, _t(np.asarray(want, dtype=np.float64)), rtol=RTOL, atol=1e-12)


def _linear(weight: np.ndarray, bias: np.ndarray | None = None) -> nn.Linear:
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).double()
    with torch.no_grad():
        fc.weight.copy_(_t(weight))
        if bias is not None:
            fc.bias.copy_(_t(bias))
    return fc


def _ctx(num_classes: int, batch: int = 8, **kw) -> MethodContext:
    return MethodContext(num_classes=num_classes, num_train=100, epochs=240, batch_size=batch, **kw)


def _batch(y: torch.Tensor, epoch: int = 0, epochs: int = 240) -> Batch:
    n = len(y)
    return Batch(x=torch.zeros(n, 1), y=y, index=torch.arange(n), epoch=epoch, epochs=epochs)


# ----------------------------------------------------------------------------- sdd


def _sdd(g: dict, **params):
    from kdbench.methods.sdd import SDD

    fc_s, fc_t = _linear(g["W_s"], g["b_s"]), _linear(g["W_t"], g["b_t"])
    shapes_s, shapes_t = {"stages": [g["f_s"].shape[1:]]}, {"stages": [g["f_t"].shape[1:]]}
    ctx = _ctx(5, student_shapes=shapes_s, teacher_shapes=shapes_t)
    ctx.student_classifier, ctx.teacher_classifier = fc_s, fc_t
    return SDD(ctx, **params), fc_s, fc_t


@pytest.mark.parametrize("T", [4.0, 2.0])
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 2)])
def test_sdd_matches_the_authors_sdd_kd_loss(scales, T):
    g = _load("sdd")
    key = f"sdd_M{''.join(map(str, scales))}_T{T:g}"
    assert g[f"{key}_n_complementary"] > 0  # the fixture has complementary and consistent regions
    m, fc_s, _ = _sdd(g, T=T, scales=scales)
    f_s, y = _t(g["f_s"]).requires_grad_(), _t(g["y"])
    logits = torch.zeros(len(y), 5, dtype=torch.float64)
    s = Features(logits=logits, stages=[torch.zeros(1), f_s])
    t = Features(logits=logits, stages=[_t(g["f_t"])])
    loss = m(s, t, _batch(y))["sdd"]
    _close(loss, g[f"{key}_loss"])
    loss.backward()
    _close(f_s.grad, g[f"{key}_grad_f_s"])
    # the student's own classifier learns from the region logits; not a submodule of the method
    _close(fc_s.weight.grad, g[f"{key}_grad_W_s"])
    _close(fc_s.bias.grad, g[f"{key}_grad_b_s"])
    assert list(m.parameters()) == []


def test_sdd_complementary_weight_matters():
    """Weighting every region 1 (a changed constant) gives a different loss from the reference's."""
    from kdbench.methods.sdd import _apply, region_features

    g = _load("sdd")
    m, fc_s, fc_t = _sdd(g)
    z_s = _apply(fc_s, region_features(_t(g["f_s"]), (1, 2, 4)))
    z_t = _apply(fc_t, region_features(_t(g["f_t"]), (1, 2, 4)))
    log_p_s, p_t = z_s.div(4).log_softmax(-1), z_t.div(4).softmax(-1)
    uniform = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 16
    assert abs(uniform.item() - float(g["sdd_M124_T4_loss"])) > 1e-3


def test_sdd_global_scale_only_is_kd_on_the_logits():
    from kdbench.kernels import kd_loss

    g = _load("sdd")
    m, _, _ = _sdd(g, scales=(1,))
    gen = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randn(8, 5, generator=gen).double()
    got = m(Features(logits=zs), Features(logits=zt), _batch(_t(g["y"])))["sdd"]
    _close(got, kd_loss(zs, zt, 4.0))


def test_sdd_defaults_and_errors():
    from kdbench.methods.sdd import SDD

    sig = inspect.signature(SDD.__init__).parameters
    assert (sig["T"].default, tuple(sig["scales"].default)) == (4.0, (1, 2, 4))
    assert SDD.default_weights == {"ce": 0.1, "sdd": 0.9}
    g = _load("sdd")
    for bad in [(2, 4), (1, 4, 2), (1, 3)]:
        with pytest.raises(ConfigError, match="scales"):
            _sdd(g, scales=bad)
    with pytest.raises(ConfigError, match="classifier"):
        SDD(_ctx(5, student_shapes={"stages": [(6, 8, 8)]}, teacher_shapes={"stages": [(12, 4, 4)]}))
    ctx = _ctx(5, student_shapes={"stages": [(7, 8, 8)]}, teacher_shapes={"stages": [(12, 4, 4)]})
    ctx.student_classifier, ctx.teacher_classifier = nn.Linear(6, 5), nn.Linear(12, 5)
    with pytest.raises(ConfigError, match="7 channels"):
        SDD(ctx)


# ----------------------------------------------------------------------------- wkd


def _wkd_ctx(g: dict) -> MethodContext:
    ctx = _ctx(
        10, student_shapes={"stages": [g["f_s"].shape[1:]]}, teacher_shapes={"stages": [g["f_t"].shape[1:]]}
    )
    ctx.teacher_classifier = _linear(g["W_t"])
    return ctx


WKDL_CASES = [(8.0, 0.05, 10), (2.0, 0.1, 30)]


@pytest.mark.parametrize("sharpen", [1.0, 0.0])
@pytest.mark.parametrize("T,lam,iters", WKDL_CASES)
def test_wkd_l_matches_the_authors(T, lam, iters, sharpen):
    from kdbench.methods.wkd import WKD

    g = _load("wkd")
    m = WKD(_wkd_ctx(g), T=T, sinkhorn_lambda=lam, sinkhorn_iters=iters, sharpen=sharpen)
    _close(m.cost, g[f"cost_sharpen{sharpen:g}"])
    zs, zt, y = _t(g["zs"]).requires_grad_(), _t(g["zt"]), _t(g["y"])
    terms = m(Features(logits=zs), Features(logits=zt), _batch(y))
    key = f"wkdl_s{sharpen:g}_T{T:g}_l{lam:g}_i{iters}"
    _close(terms["wkd_target"], g[f"{key}_g0_loss"])  # the target term alone (γ = 0)
    total = terms["wkd_target"] + 600.0 * terms["wkd_l"]
    _close(total, g[f"{key}_g600_loss"])
    total.backward()
    _close(zs.grad, g[f"{key}_g600_grad"])


def test_wkd_cosine_decay_matches_the_reference():
    from kdbench.methods.wkd import WKD, cosine_decay

    g = _load("wkd")
    got = [cosine_decay(int(e), 240, 150.0) for e in g["decay_epochs"]]
    np.testing.assert_allclose(got, g["decay_factors"], rtol=RTOL, atol=1e-15)
    # the method decays the Wasserstein term, not the target term (engine epochs count from 0)
    m = WKD(_wkd_ctx(g))
    zs, zt, y = _t(g["zs"]), _t(g["zt"]), _t(g["y"])
    early = m(Features(logits=zs), Features(logits=zt), _batch(y, epoch=0))
    late = m(Features(logits=zs), Features(logits=zt), _batch(y, epoch=199))
    _close(late["wkd_target"], early["wkd_target"])
    _close(late["wkd_l"], early["wkd_l"] * g["decay_factors"][3])


@pytest.mark.parametrize("grid,ratio", [(1, 4.0), (4, 3.0), (2, 8.0)])
def test_wkd_f_matches_the_authors(grid, ratio):
    from kdbench.methods.wkd import WKD

    g = _load("wkd")
    m = WKD(_wkd_ctx(g), mode="f", grid=grid, ratio=ratio).double()
    with torch.no_grad():
        m.regressor.conv.weight.copy_(_t(g["reg_W"]))
        m.regressor.conv.bias.copy_(_t(g["reg_b"]))
    f_s = _t(g["f_s"]).requires_grad_()
    logits = torch.zeros(8, 10, dtype=torch.float64)
    terms = m(
        Features(logits=logits, stages=[f_s]),
        Features(logits=logits, stages=[_t(g["f_t"])]),
        _batch(_t(g["y"])),
    )
    assert set(terms) == {"wkd_f"}
    key = f"wkdf_g{grid}_r{ratio:g}"
    _close(terms["wkd_f"], g[f"{key}_loss"])
    terms["wkd_f"].backward()
    _close(f_s.grad, g[f"{key}_grad"])
    _close(m.regressor.conv.weight.grad, g[f"{key}_grad_reg_W"])


def test_wkd_cost_from_a_file(tmp_path):
    from kdbench.methods.wkd import WKD

    g = _load("wkd")
    dist = (
        1
        - torch.nn.functional.normalize(_t(g["W_t"]), dim=1)
        @ torch.nn.functional.normalize(_t(g["W_t"]), dim=1).T
    )
    np.save(tmp_path / "cost.npy", dist.numpy())
    m = WKD(_wkd_ctx(g), cost=str(tmp_path / "cost.npy"))
    torch.testing.assert_close(m.cost.double(), _t(g["cost_sharpen1"]), rtol=1e-6, atol=1e-7)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    with pytest.raises(ConfigError, match="10×10"):
        WKD(_wkd_ctx(g), cost=str(tmp_path / "bad.npy"))
    with pytest.raises(ConfigError, match="no such file"):
        WKD(_wkd_ctx(g), cost=str(tmp_path / "missing.pt"))


def test_wkd_defaults_are_the_cifar100_configs():
    from kdbench.methods.wkd import WKD

    sig = inspect.signature(WKD.__init__).parameters
    got = [
        sig[k].default for k in ("mode", "T", "sinkhorn_lambda", "sinkhorn_iters", "sharpen", "grid", "eps")
    ]
    assert got == ["l", 8.0, 0.05, 10, 1.0, 1, 1e-5]
    assert sig["decay_start"].default * 240 == pytest.approx(150)
    assert WKD.weights_for() == {"ce": 1.0, "wkd_target": 1.0, "wkd_l": 600.0}
    assert WKD.weights_for(mode="f") == {"ce": 1.0, "wkd_f": 0.08}
    assert WKD.weights_for(mode="lf") == {"ce": 1.0, "wkd_target": 1.0, "wkd_l": 200.0, "wkd_f": 0.08}
    g = _load("wkd")
    assert (WKD(_wkd_ctx(g), mode="f").ratio, WKD(_wkd_ctx(g), mode="lf").ratio) == (4.0, 8.0)
    assert WKD.taps_for(mode="l").student == ("logits",) and "stages" in WKD.taps_for(mode="lf").teacher
    with pytest.raises(ConfigError, match="mode"):
        WKD(_wkd_ctx(g), mode="x")


def test_wkd_f_refuses_regions_of_one_position():
    """A one-position region has no (unbiased) variance: the loss would be NaN, so it is refused."""
    from kdbench.methods.wkd import WKD

    def ctx(size: int) -> MethodContext:
        return _ctx(
            10, student_shapes={"stages": [(6, size, size)]}, teacher_shapes={"stages": [(12, size, size)]}
        )

    with pytest.raises(ConfigError, match="at least 2 positions"):
        WKD(ctx(1), mode="f")
    with pytest.raises(ConfigError, match="grid 4 leaves 1"):
        WKD(ctx(4), mode="f", grid=4)
    WKD(ctx(2), mode="f")  # 4 positions: fine
    WKD(ctx(8), mode="f", grid=4)  # the wrn40_2 config's grid on an 8×8 map: 2×2 per region


# ----------------------------------------------------------------------------- srd


@pytest.mark.parametrize("exponent,T", [(4.0, 1.0), (2.0, 4.0)])
def test_srd_matches_torchdistill(exponent, T):
    from kdbench.methods.srd import SRD

    g = _load("srd")
    ctx = _ctx(10, student_shapes={"pooled": (6,)}, teacher_shapes={"pooled": (12,)})
    m = SRD(ctx, exponent=exponent, T=T).double()
    with torch.no_grad():
        m.projector.weight.copy_(_t(g["proj_W"]))
        m.projector.bias.copy_(_t(g["proj_b"]))
    f_s, zs = _t(g["f_s"]).requires_grad_(), _t(g["zs"]).requires_grad_()
    s = Features(logits=zs, pooled=f_s.mean((2, 3)))  # the pooled feature is the last stage's mean
    t = Features(logits=_t(g["zt"]), pooled=_t(g["f_t"]).mean((2, 3)))
    loss = m(s, t, _batch(torch.zeros(8, dtype=torch.long)))["srd"]
    key = f"srd_e{exponent:g}_T{T:g}"
    _close(loss, g[f"{key}_loss"])
    loss.backward()
    _close(f_s.grad, g[f"{key}_grad_f_s"])
    _close(zs.grad, g[f"{key}_grad_zs"])
    _close(m.projector.weight.grad, g[f"{key}_grad_proj_W"])
    # the bias is removed by the batch normalisation: its gradient vanishes in both
    assert m.projector.bias.grad.abs().max() < 1e-12 and np.abs(g[f"{key}_grad_proj_b"]).max() < 1e-12


def test_srd_defaults_are_the_authors_config():
    from kdbench.methods.srd import SRD

    sig = inspect.signature(SRD.__init__).parameters
    assert (sig["exponent"].default, sig["T"].default, sig["eps"].default) == (4.0, 1.0, 1e-4)
    assert SRD.default_weights == {"ce": 1.0, "srd": 1.0}


# ----------------------------------------------------------------------------- dist+

DISTPLUS_CASES = [(2.0, 2.0, 1.0, 1.0, 1.0), (1.0, 0.5, 3.0, 2.0, 4.0)]


def _distplus_key(beta, gamma, iota, kappa, tau) -> str:
    return f"distplus_b{beta:g}_g{gamma:g}_i{iota:g}_k{kappa:g}_t{tau:g}"


@pytest.mark.parametrize("case", DISTPLUS_CASES)
def test_distplus_terms_match_torchdistill(case):
    from kdbench.methods.distplus import channel_correlation, dist_logit_loss, spatial_correlation

    g = _load("distplus")
    beta, gamma, _, _, tau = case
    key = _distplus_key(*case)
    zs, f_s, f_t = _t(g["zs"]).requires_grad_(), _t(g["f_s"]), _t(g["f_t"])
    dist = dist_logit_loss(zs, _t(g["zt"]), beta, gamma, tau, 1e-8)
    _close(dist, g[f"{key}_dist"])
    dist.backward()
    _close(zs.grad, g[f"{key}_dist_grad_zs"])
    for name, fn in (("channel_relation", channel_correlation), ("spatial_relation", spatial_correlation)):
        fs = f_s.clone().requires_grad_()
        value = fn(fs, f_t, 1e-8)
        # torchdistill's channel_relation is the correlation ρ itself; its spatial_relation is 1 − ρ
        ref = g[f"{key}_{name}"] if name == "channel_relation" else 1 - g[f"{key}_{name}"]
        _close(value, ref)
        value.backward()
        sign = 1.0 if name == "channel_relation" else -1.0
        _close(fs.grad, sign * g[f"{key}_{name}_grad_f_s"])


@pytest.mark.parametrize("case", DISTPLUS_CASES)
def test_distplus_total_is_torchdistill_with_the_channel_term_as_one_minus_rho(case):
    from kdbench.methods.distplus import DISTPlus

    g = _load("distplus")
    beta, gamma, iota, kappa, tau = case
    key = _distplus_key(*case)
    ctx = _ctx(10, student_shapes={"stages": [(12, 4, 4)]}, teacher_shapes={"stages": [(12, 4, 4)]})
    m = DISTPlus(ctx, beta=beta, gamma=gamma, iota=iota, kappa=kappa, tau=tau)
    assert m.projector is None  # equal maps are compared as they are, as in the reference
    zs, f_s = _t(g["zs"]).requires_grad_(), _t(g["f_s"]).requires_grad_()
    s = Features(logits=zs, stages=[f_s])
    t = Features(logits=_t(g["zt"]), stages=[_t(g["f_t"])])
    loss = m(s, t, _batch(torch.zeros(8, dtype=torch.long)))["distplus"]
    # reference total + ι·((1 − ρ) − ρ): only the channel term's sign convention differs
    rho = float(g[f"{key}_channel_relation"])
    _close(loss, g[f"{key}_loss"] + iota * (1 - 2 * rho))
    loss.backward()
    _close(zs.grad, g[f"{key}_grad_zs"])
    _close(f_s.grad, g[f"{key}_grad_f_s"] - 2 * iota * g[f"{key}_channel_relation_grad_f_s"])


def test_distplus_defaults_and_unequal_maps():
    from kdbench.methods.distplus import DISTPlus

    sig = inspect.signature(DISTPlus.__init__).parameters
    assert [sig[k].default for k in ("beta", "gamma", "iota", "kappa", "tau")] == [2.0, 2.0, 1.0, 1.0, 1.0]
    assert DISTPlus.default_weights == {"ce": 1.0, "distplus": 2.0}
    ctx = _ctx(10, student_shapes={"stages": [(6, 8, 8)]}, teacher_shapes={"stages": [(12, 4, 4)]})
    m = DISTPlus(ctx)
    assert m.projector is not None
    gen = torch.Generator().manual_seed(1)
    s = Features(logits=torch.randn(4, 10, generator=gen), stages=[torch.randn(4, 6, 8, 8, generator=gen)])
    t = Features(logits=torch.randn(4, 10, generator=gen), stages=[torch.randn(4, 12, 4, 4, generator=gen)])
    assert torch.isfinite(m(s, t, _batch(torch.zeros(4, dtype=torch.long)))["distplus"])


# ----------------------------------------------------------------------------- gradients, end to end


def test_gradcheck_on_student_inputs():
    from kdbench.methods.distplus import DISTPlus
    from kdbench.methods.sdd import SDD
    from kdbench.methods.srd import SRD
    from kdbench.methods.wkd import WKD

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    y = torch.randint(0, 5, (6,), generator=gen)
    zs, zt = rnd(6, 5, scale=2), rnd(6, 5, scale=3)
    maps = {"stages": [(4, 4, 4)]}
    ctx = _ctx(5, 6, student_shapes={**maps, "pooled": (4,)}, teacher_shapes={**maps, "pooled": (4,)})
    ctx.student_classifier, ctx.teacher_classifier = nn.Linear(4, 5).double(), nn.Linear(4, 5).double()
    f_t = rnd(6, 4, 4, 4)
    cases = [
        (SDD(ctx), "sdd", lambda f: Features(logits=zt, stages=[f]), rnd(6, 4, 4, 4)),
        (WKD(ctx).double(), "wkd_l", lambda z: Features(logits=z), rnd(6, 5, scale=2)),
        (SRD(ctx).double(), "srd", lambda p: Features(logits=p[:, :5], pooled=p[:, 5:]), rnd(6, 9)),
        (DISTPlus(ctx), "distplus", lambda f: Features(logits=zs, stages=[f]), rnd(6, 4, 4, 4)),
    ]
    teacher = Features(logits=zt, stages=[f_t], pooled=f_t.mean((2, 3)))
    for m, term, feats, x in cases:

        def f(x: torch.Tensor, m=m, term=term, feats=feats) -> torch.Tensor:
            return m(feats(x), teacher, _batch(y, epoch=5))[term]

        assert gradcheck(f, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-5), term


@pytest.mark.parametrize(
    "name,params",
    [
        ("sdd", {}),
        ("wkd", {}),
        ("wkd", {"mode": "f"}),
        ("wkd", {"mode": "lf"}),
        ("srd", {}),
        ("distplus", {}),
    ],
)
def test_trains_a_tiny_student_through_the_engine(name, params):
    """Two epochs through the engine's training loop with a narrower student than the teacher."""
    from kdbench import registry
    from kdbench.features import FeatureReader, discover_taps, probe_features
    from kdbench.models.smallcnn import smallcnn
    from tests._train_method import train_method

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 16, 16, generator=g)
    y = torch.arange(32) % 4
    cls = registry.load("losses", name)
    taps = cls.taps_for(**params)

    def model(seed: int, width: int, wanted):
        torch.manual_seed(seed)
        net = smallcnn(4, 1, width)
        spec = discover_taps(net)
        return net, spec, FeatureReader(net, spec, wanted)

    student, s_spec, s_reader = model(1, 4, taps.student)
    teacher, t_spec, t_reader = model(2, 8, taps.teacher)
    teacher.eval()
    ctx = MethodContext(
        num_classes=4,
        num_train=32,
        epochs=2,
        batch_size=16,
        student_shapes=probe_features(student, s_spec, x[:4]).shapes(),
        teacher_shapes=probe_features(teacher, t_spec, x[:4]).shapes(),
        teacher_classifier=teacher.get_submodule(t_spec.classifier),
        student_classifier=student.get_submodule(s_spec.classifier),
    )
    method = cls(ctx, **params)
    before = [p.detach().clone() for p in method.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    train_method(method, params, student, s_reader, t_reader, x, y, epochs=2)
    assert all(not torch.equal(b, a) for b, a in zip(before, method.parameters(), strict=True))
    assert all(torch.equal(b, a) for b, a in zip(teacher_before, teacher.parameters(), strict=True))
