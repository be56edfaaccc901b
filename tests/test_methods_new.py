"""Golden tests of logit standardization, CTKD, TTM / WTTM and NKD against the authors' code.

Each fixture in ``tests/fixtures/golden/<name>.npz`` holds fixed float64 inputs, any learnable
glue weights, and the loss and gradients the authors' own loss code produced on them; the
``.md`` next to it names the repository, commit, file and the script that made it. The methods
must reproduce both to rel 1e-6, so a changed constant, temperature factor or reduction fails.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

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


def _ctx(num_classes: int, batch: int = 8) -> MethodContext:
    return MethodContext(num_classes=num_classes, num_train=100, epochs=240, batch_size=batch)


def _batch(y: torch.Tensor, epoch: int = 0, views: dict | None = None) -> Batch:
    n = len(y)
    return Batch(x=torch.zeros(n, 1), y=y, index=torch.arange(n), epoch=epoch, epochs=240, views=views or {})


def _weighted_total(method, terms: dict[str, torch.Tensor], z_s: torch.Tensor, y: torch.Tensor, **params):
    """The engine's total: CE on the student logits plus every term times its default weight."""
    w = {"ce": 1.0, **type(method).weights_for(**params)}
    return w["ce"] * F.cross_entropy(z_s, y) + sum(w[k] * v for k, v in terms.items())


# ----------------------------------------------------------------------------- logit standardization


def test_kd_standardized_matches_the_authors_kd():
    from kdbench.methods.kd import KD

    g = _load("logit_standardization")
    zs, zt, y = _t(g["zs_w"]).requires_grad_(), _t(g["zt_w"]), _t(g["y"])
    m = KD(_ctx(10), standardize=True)
    assert m.T == 2.0 and KD.weights_for(standardize=True) == {"ce": 0.1, "kd": 9.0}
    terms = m(Features(logits=zs), Features(logits=zt), _batch(y))
    _close(9.0 * terms["kd"], g["kd_loss_kd"])
    _close(0.1 * F.cross_entropy(zs, y), g["kd_loss_ce"])
    _weighted_total(m, terms, zs, y, standardize=True).backward()
    _close(zs.grad, g["kd_grad"])


def test_kd_default_is_unchanged_by_the_option():
    from kdbench.methods.kd import KD

    g = _load("logit_standardization")
    zs, zt, y = _t(g["zs_w"]).requires_grad_(), _t(g["zt_w"]), _t(g["y"])
    loss = KD(_ctx(10))(Features(logits=zs), Features(logits=zt), _batch(y))["kd"]
    _close(loss, g["kd_plain_T4"])
    loss.backward()
    _close(zs.grad, g["kd_plain_T4_grad"])
    assert KD.weights_for() == {"ce": 0.1, "kd": 0.9}


def test_dkd_standardized_matches_the_authors_dkd_with_warmup():
    from kdbench.methods.dkd import DKD

    g = _load("logit_standardization")
    zs, zt, y = _t(g["zs_w"]).requires_grad_(), _t(g["zt_w"]), _t(g["y"])
    m = DKD(_ctx(10), standardize=True)
    # the reference counts epochs from 1, the engine from 0
    terms = m(Features(logits=zs), Features(logits=zt), _batch(y, epoch=int(g["dkd_epoch"]) - 1))
    # the authors multiply alpha and beta by 9; kdbench weights the dkd term 9 instead
    _close(9.0 * terms["dkd"], g["dkd_loss_kd"])
    _close(F.cross_entropy(zs, y), g["dkd_loss_ce"])
    _weighted_total(m, terms, zs, y, standardize=True).backward()
    _close(zs.grad, g["dkd_grad"])


def test_mlkd_standardized_matches_the_authors_mlkd():
    from kdbench.methods.mlkd import MLKD

    g = _load("logit_standardization")
    zs_w, zs_s = _t(g["zs_w"]).requires_grad_(), _t(g["zs_s"]).requires_grad_()
    zt_w, zt_s, y = _t(g["zt_w"]), _t(g["zt_s"]), _t(g["y"])
    views = {"strong": (Features(logits=zs_s), Features(logits=zt_s))}
    m = MLKD(_ctx(10), standardize=True)
    terms = m(Features(logits=zs_w), Features(logits=zt_w), _batch(y, views=views))
    w = {"ce": 1.0, **MLKD.weights_for(standardize=True)}
    assert (w["kd"], w["cc"], w["bc"], w["ce"], w["ce_strong"]) == (9.0, 9.0, 9.0, 0.1, 0.1)
    for term in ("kd", "cc", "bc"):
        _close(w[term] * terms[term], g[f"mlkd_loss_{term}"])
    _close(w["ce"] * F.cross_entropy(zs_w, y) + w["ce_strong"] * terms["ce_strong"], g["mlkd_loss_ce"])
    _weighted_total(m, terms, zs_w, y, standardize=True).backward()
    _close(zs_w.grad, g["mlkd_grad_weak"])
    _close(zs_s.grad, g["mlkd_grad_strong"])


def test_standardize_uses_base_T_and_refuses_an_ignored_T():
    from kdbench.errors import ConfigError
    from kdbench.methods.dkd import DKD
    from kdbench.methods.kd import KD
    from kdbench.methods.mlkd import MLKD

    assert KD(_ctx(10), standardize=True, base_T=3.0).T == 3.0
    for cls in (KD, DKD, MLKD):
        with pytest.raises(ConfigError, match="base_T"):
            cls(_ctx(10), T=3.0, standardize=True)


def test_added_params_stay_out_of_the_cell_unless_set():
    """Cells of grids that do not use ``standardize`` keep the ids they had."""
    from kdbench.config import PluginRef

    resolved = {"T": 4.0, "standardize": False, "base_T": 2.0}
    assert PluginRef(kind="losses", name="kd", params=resolved).method_params == {"T": 4.0}
    ls = PluginRef(kind="losses", name="kd", params={**resolved, "standardize": True}, given=["standardize"])
    assert ls.method_params == {"T": 4.0, "standardize": True, "base_T": 2.0}


# ----------------------------------------------------------------------------- ctkd


def _mlp_params(m) -> tuple[torch.Tensor, ...]:
    return m.mlp[0].weight, m.mlp[0].bias, m.mlp[2].weight, m.mlp[2].bias


def _ctkd_batch(g: dict) -> Batch:
    # the reference counts epochs from 1, the engine from 0
    return _batch(torch.zeros(8, dtype=torch.long), epoch=int(g["epoch"]) - 1)


def _ctkd(g: dict, **params):
    from kdbench.methods.ctkd import CTKD

    m = CTKD(_ctx(10), **params).double()
    if m.mode == "global":
        with torch.no_grad():
            m.global_T.fill_(float(g["global_T"]))
    else:
        with torch.no_grad():
            for p, key in zip(_mlp_params(m), ("W1", "b1", "W2", "b2"), strict=True):
                p.copy_(_t(g[f"inst_{key}"]))
    return m


def test_ctkd_curriculum_matches_the_reference_cosine_decay():
    from kdbench.methods.ctkd import cosine_curriculum

    g = _load("ctkd")
    got = [cosine_curriculum(e, 0.0, 1.0, 10) for e in range(1, 16)]
    # the reference's decay value is −λ (decay_max 0, decay_min −1, 10 loops)
    np.testing.assert_allclose(got, -g["decay_values"], rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("standardize,prefix", [(False, "global"), (True, "global_ls")])
def test_ctkd_global_matches_the_authors_ctkd(standardize, prefix):
    g = _load("ctkd")
    m = _ctkd(g, standardize=standardize)
    zs, zt = _t(g["zs"]).requires_grad_(), _t(g["zt"])
    loss = m(Features(logits=zs), Features(logits=zt), _ctkd_batch(g))
    _close(loss["ctkd"], g[f"{prefix}_loss"])
    _close(m.summary()["temperature"], g[f"{prefix}_temp"])
    loss["ctkd"].backward()
    _close(zs.grad, g[f"{prefix}_grad"])
    # the reversed (−λ-scaled) gradient reaches the temperature
    _close(m.global_T.grad, g[f"{prefix}_grad_global_T"])


def test_ctkd_instance_matches_the_authors_instance_loss():
    g = _load("ctkd")
    m = _ctkd(g, mode="instance", hidden=16)
    zs, zt = _t(g["zs"]).requires_grad_(), _t(g["zt"])
    loss = m(Features(logits=zs), Features(logits=zt), _ctkd_batch(g))
    _close(loss["ctkd"], g["inst_loss"])
    _close(m._last_T[:, 0], g["inst_temp"])
    loss["ctkd"].backward()
    _close(zs.grad, g["inst_grad"])
    for p, key in zip(_mlp_params(m), ("W1", "b1", "W2", "b2"), strict=True):
        _close(p.grad, g[f"inst_grad_{key}"])


def test_ctkd_defaults_and_weights_are_the_authors():
    from kdbench.methods.ctkd import CTKD

    sig = inspect.signature(CTKD.__init__).parameters
    assert (sig["t_start"].default, sig["t_end"].default) == (1.0, 20.0)
    curriculum = [sig[k].default for k in ("lambda_start", "lambda_end", "lambda_epochs")]
    assert curriculum == [0.0, 1.0, 10]
    assert CTKD.weights_for() == {"ce": 0.1, "ctkd": 0.9}
    assert CTKD.weights_for(standardize=True) == {"ce": 0.1, "ctkd": 9.0}
    assert CTKD(_ctx(10)).global_T.item() == 1.0


# ----------------------------------------------------------------------------- ttm / wttm


@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_ttm_and_wttm_match_the_authors(name, gamma):
    from kdbench.methods.ttm import TTM
    from kdbench.methods.wttm import WTTM

    g = _load("ttm")
    cls = {"ttm": TTM, "wttm": WTTM}[name]
    zs, zt = _t(g["zs"]).requires_grad_(), _t(g["zt"])
    loss = cls(_ctx(10), gamma=gamma)(Features(logits=zs), Features(logits=zt), _batch(torch.zeros(8).long()))
    _close(loss[name], g[f"{name}_{gamma:g}_loss"])
    loss[name].backward()
    _close(zs.grad, g[f"{name}_{gamma:g}_grad"])


def test_ttm_defaults_are_the_readme_command():
    from kdbench.methods.ttm import TTM
    from kdbench.methods.wttm import WTTM

    assert inspect.signature(TTM.__init__).parameters["gamma"].default == 0.1
    assert TTM.default_weights == {"ce": 1.0, "ttm": 45.0}
    assert inspect.signature(WTTM.__init__).parameters["gamma"].default == 0.2
    assert WTTM.default_weights == {"ce": 1.0, "wttm": 4.0}


# ----------------------------------------------------------------------------- nkd


@pytest.mark.parametrize("T,gamma", [(3.0, 3.5), (1.0, 1.5)])
def test_nkd_matches_the_authors(T, gamma):
    from kdbench.methods.nkd import NKD

    g = _load("nkd")
    zs, zt, y = _t(g["zs"]).requires_grad_(), _t(g["zt"]), _t(g["y"])
    loss = NKD(_ctx(10), T=T, gamma=gamma)(Features(logits=zs), Features(logits=zt), _batch(y))["nkd"]
    _close(loss, g[f"nkd_T{T:g}_g{gamma:g}_loss"])
    loss.backward()
    _close(zs.grad, g[f"nkd_T{T:g}_g{gamma:g}_grad"])


def test_nkd_defaults_are_the_cifar100_config():
    from kdbench.methods.nkd import NKD

    sig = inspect.signature(NKD.__init__).parameters
    assert (sig["T"].default, sig["gamma"].default) == (3.0, 3.5)
    assert NKD.default_weights == {"ce": 1.0, "nkd": 1.0}


# ----------------------------------------------------------------------------- gradients, end to end


def _gradcheck_cases():
    from kdbench.methods.ctkd import CTKD
    from kdbench.methods.nkd import NKD
    from kdbench.methods.ttm import TTM
    from kdbench.methods.wttm import WTTM

    return [
        (TTM, {}, "ttm"),
        (WTTM, {}, "wttm"),
        (NKD, {}, "nkd"),
        (CTKD, {}, "ctkd"),
        # instance mode is left out: its temperature reads the student logits detached, by design
        (CTKD, {"standardize": True}, "ctkd"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_gradcheck_on_student_logits(case):
    cls, params, term = _gradcheck_cases()[case]
    g = torch.Generator().manual_seed(case)
    zs = torch.randn(6, 10, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (6,), generator=g)
    m = cls(_ctx(10, 6), **params).double()

    def f(z: torch.Tensor) -> torch.Tensor:
        return m(Features(logits=z), Features(logits=zt), _batch(y, epoch=5))[term]

    assert gradcheck(f, (zs.clone().requires_grad_(),), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "name,params",
    [
        # λ at 1 from the first epoch: with the default curriculum λ is 0.02 and 0.10 in the two
        # epochs, and the global temperature's update can round away at 1.0 (the test then
        # depended on the thread count other tests left)
        ("ctkd", {"lambda_epochs": 1}),
        ("ctkd", {"mode": "instance"}),
        ("ttm", {}),
        ("wttm", {}),
        ("nkd", {}),
        ("kd", {"standardize": True}),
    ],
)
def test_trains_a_tiny_student_through_the_engine(name, params):
    """Two epochs through the engine's training loop: finite losses, CTKD's temperature learns."""
    from kdbench import registry
    from kdbench.features import FeatureReader, discover_taps
    from kdbench.models.smallcnn import smallcnn
    from tests._train_method import train_method

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = torch.arange(32) % 4

    def model(seed: int):
        torch.manual_seed(seed)
        net = smallcnn(4, 1, 4)
        return net, FeatureReader(net, discover_taps(net), ["logits"])

    student, s_reader = model(1)
    teacher, t_reader = model(2)
    teacher.eval()
    cls = registry.load("losses", name)
    method = cls(MethodContext(num_classes=4, num_train=32, epochs=2, batch_size=16), **params)
    before = [p.detach().clone() for p in method.parameters()]
    train_method(method, params, student, s_reader, t_reader, x, y, epochs=2)
    after = list(method.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    if name == "ctkd":
        assert 1.0 < method.summary()["temperature"] < 21.0
