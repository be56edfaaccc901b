"""Golden tests of MGD and DiffKD against the authors' code, and a short training run of each.

Each fixture in ``tests/fixtures/golden/<name>.npz`` holds fixed float64 inputs, the reference
modules' learnable weights, the reference's random draws (MGD's uniform mask draw, DiffKD's noises
and timesteps) with the seed that produced them, and the loss and gradients the authors' code gave;
the ``.md`` next to it names the repository, commit, files and the script. kdbench must reproduce the
loss and every gradient to rel 1e-6, with the draws passed in and with the same seed.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


def _ctx(s_stage: tuple, t_stage: tuple, num_classes: int = 10, batch: int = 4) -> MethodContext:
    return MethodContext(
        num_classes=num_classes,
        num_train=100,
        epochs=240,
        batch_size=batch,
        student_shapes={"stages": [(3, 28, 28), s_stage]},
        teacher_shapes={"stages": [(3, 28, 28), t_stage]},
    )


def _batch(y: torch.Tensor) -> Batch:
    n = len(y)
    return Batch(x=torch.zeros(n, 1), y=y, index=torch.arange(n), epochs=240)


def _feats(stage: torch.Tensor, logits: torch.Tensor | None = None) -> Features:
    # stages[0] is a placeholder: both methods read stages[-1] by default
    return Features(stages=[torch.zeros(1), stage], logits=logits)


# ----------------------------------------------------------------------------- mgd

MGD_CASES = [
    ("channel", "fs", "channel"),
    ("channel_same", "fs_same", "channel"),
    ("spatial", "fs", "spatial"),
]


def _mgd(g: dict, key: str, fs: torch.Tensor, mask: str):
    from kdbench.methods.mgd import MGD

    ft = _t(g["ft"])
    m = MGD(_ctx(tuple(fs.shape[1:]), tuple(ft.shape[1:])), mask_ratio=float(g[f"{key}_lambda"]), mask=mask)
    m = m.double()
    prefix = f"{key}_w."
    weights = {k[len(prefix) :]: _t(v) for k, v in g.items() if k.startswith(prefix)}
    assert set(weights) == {n for n, _ in m.named_parameters()}  # same layers as the reference
    m.load_state_dict(weights)
    return m


def _reference_mask(g: dict, key: str) -> torch.Tensor:
    u, lam = _t(g[f"{key}_uniform"]), float(g[f"{key}_lambda"])
    # the reference: where(u < λ, 0, 1) (channel, cls) / where(u > 1 − λ, 0, 1) (spatial, det)
    drop = u < lam if key.startswith("channel") else u > 1 - lam
    return (~drop).double()


@pytest.mark.parametrize("key,fs_key,mask", MGD_CASES)
def test_mgd_matches_the_authors_with_the_same_seed(key, fs_key, mask):
    g = _load("mgd")
    fs, ft = _t(g[fs_key]).requires_grad_(), _t(g["ft"])
    m = _mgd(g, key, fs, mask)
    assert (m.align is None) == (fs.shape[1] == ft.shape[1])
    torch.manual_seed(int(g[f"{key}_seed"]))  # the reference drew its mask right after this seed
    term = m(_feats(fs), _feats(ft), _batch(torch.zeros(4, dtype=torch.long)))["mgd"]
    loss = float(g[f"{key}_alpha"]) * term
    _close(loss, g[f"{key}_loss"])
    loss.backward()
    _close(fs.grad, g[f"{key}_grad_fs"])
    for name, p in m.named_parameters():
        _close(p.grad, g[f"{key}_grad.{name}"])


@pytest.mark.parametrize("key,fs_key,mask", MGD_CASES)
def test_mgd_fixed_mask_and_generator_reproduce_the_reference_draw(key, fs_key, mask):
    g = _load("mgd")
    fs, ft = _t(g[fs_key]), _t(g["ft"])
    m = _mgd(g, key, fs, mask)
    want = _reference_mask(g, key)
    assert 0 < want.sum() < want.numel()  # the fixture masks some entries, not all
    drawn = m.draw_mask(ft, torch.Generator().manual_seed(int(g[f"{key}_seed"])))
    assert drawn.dtype == ft.dtype and torch.equal(drawn, want)
    _close(float(g[f"{key}_alpha"]) * m.loss(fs, ft, want), g[f"{key}_loss"])


def test_mgd_mask_ratio_shape_and_redraw():
    from kdbench.methods.mgd import MGD

    torch.manual_seed(0)
    ft = torch.zeros(256, 32, 6, 6)
    channel = MGD(_ctx((16, 6, 6), (32, 6, 6)))
    spatial = MGD(_ctx((16, 6, 6), (32, 6, 6)), mask_ratio=0.65, mask="spatial")
    a, b = channel.draw_mask(ft), channel.draw_mask(ft)
    assert a.shape == (256, 32, 1, 1) and not torch.equal(a, b)  # a fresh mask every step
    assert abs((1 - a.mean().item()) - 0.15) < 0.02  # a fraction λ of the channels dropped
    s = spatial.draw_mask(ft)
    assert s.shape == (256, 1, 6, 6) and abs((1 - s.mean().item()) - 0.65) < 0.02
    torch.manual_seed(3)
    c1 = channel.draw_mask(ft)
    torch.manual_seed(3)
    assert torch.equal(c1, channel.draw_mask(ft))  # the default generator: seeded per cell


def test_mgd_gradcheck_with_a_fixed_mask():
    from kdbench.methods.mgd import MGD

    g = torch.Generator().manual_seed(0)
    m = MGD(_ctx((3, 4, 4), (5, 4, 4))).double()
    fs = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    mask = m.draw_mask(ft, g)
    assert gradcheck(lambda x: m.loss(x, ft, mask), (fs.requires_grad_(),), eps=1e-6, atol=1e-6)


def test_mgd_defaults_are_the_cifar100_config_and_bad_params_are_refused():
    from kdbench.methods.mgd import MGD

    sig = inspect.signature(MGD.__init__).parameters
    assert (sig["layer"].default, sig["mask_ratio"].default, sig["mask"].default) == (-1, 0.15, "channel")
    assert MGD.default_weights == {"ce": 1.0, "mgd": 0.0012}
    with pytest.raises(ConfigError, match="feature map"):
        MGD(_ctx((16,), (32, 4, 4)))
    with pytest.raises(ConfigError, match="mask"):
        MGD(_ctx((16, 4, 4), (32, 4, 4)), mask="pixel")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mask_ratio"):
        MGD(_ctx((16, 4, 4), (32, 4, 4)), mask_ratio=1.0)


# ----------------------------------------------------------------------------- diffkd

#: the reference's ModuleDict keys (the hooked module names) -> kdbench's units
_UNITS = {"layer": "feature", "fc": "logit_unit"}


def _diffkd(g: dict, **params):
    from kdbench.methods.diffkd import DiffKD

    fs, ft = g["fs"], g["ft"]
    m = DiffKD(_ctx(fs.shape[1:], ft.shape[1:]), ae_channels=int(g["ae_channels"]), **params).double()
    weights = {}
    for k, v in g.items():
        if k.startswith("w."):
            unit, _, rest = k[2:].partition(".")
            weights[f"{_UNITS[unit]}.{rest}"] = _t(v)
    assert set(weights) == {n for n, _ in m.named_parameters()}  # the reference's layers, one for one
    missing, unexpected = m.load_state_dict(weights, strict=False)
    assert not unexpected and all(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing
    )
    return m


def _fixture_draws(g: dict, unit: str) -> tuple[torch.Tensor, ...]:
    return (
        _t(g[f"{unit}_init_noise"]),
        _t(g[f"{unit}_train_noise"]).double(),  # drawn in float32, promoted as the reference's mse does
        _t(g[f"{unit}_timesteps"]),
    )


def _diffkd_step(m, g: dict):
    fs, zs = _t(g["fs"]).requires_grad_(), _t(g["zs"]).requires_grad_()
    y = _t(g["y"])
    terms = m(_feats(fs, zs), _feats(_t(g["ft"]), _t(g["zt"])), _batch(y))
    w = type(m).weights_for()
    total = w["ce"] * F.cross_entropy(zs, y) + sum(w[k] * v for k, v in terms.items())
    total.backward()
    return terms, total, fs, zs


def _check_diffkd_golden(m, g: dict, terms: dict, total, fs, zs) -> None:
    _close(terms["diffkd"], g["term_feat_mse"])
    _close(terms["diffkd_logits"], g["term_logit_kl"])
    _close(terms["ddim"], g["term_ddim_feat"] + g["term_ddim_logit"])
    _close(terms["ae"], g["term_ae"])
    _close(total, g["loss"])
    _close(fs.grad, g["grad_fs"])
    _close(zs.grad, g["grad_zs"])
    for unit, mine in _UNITS.items():
        for name, p in getattr(m, mine).named_parameters():
            _close(p.grad, g[f"grad.{unit}.{name}"])


def test_diffkd_matches_the_authors_with_their_draws():
    g = _load("diffkd")
    m = _diffkd(g)
    for unit, mine in _UNITS.items():
        draws = _fixture_draws(g, unit)
        getattr(m, mine).draw = lambda x, target, d=draws: d
    _check_diffkd_golden(m, g, *_diffkd_step(m, g))


def test_diffkd_draws_from_the_seeded_generator_in_the_reference_order():
    from kdbench.methods.diffkd import DiffusionUnit

    g = _load("diffkd")
    m = _diffkd(g)
    seen = []
    draw = DiffusionUnit.draw

    def recording(self, x, target):
        out = draw(self, x, target)
        seen.append(out)
        return out

    torch.manual_seed(int(g["seed"]))  # the reference's draws followed this seed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiffusionUnit, "draw", recording)
        _check_diffkd_golden(m, g, *_diffkd_step(m, g))
    assert len(seen) == 2
    for got, unit in zip(seen, _UNITS, strict=True):
        for a, b in zip(got, _fixture_draws(g, unit), strict=True):
            assert torch.equal(a, b)


def test_diffkd_denoises_on_the_lower_half_of_the_ddim_schedule():
    g = _load("diffkd")
    m = _diffkd(g)
    steps = []
    hook = m.feature.model.register_forward_pre_hook(lambda mod, args: steps.append(args[1].tolist()))
    x = torch.randn(4, 16, 3, 3, dtype=torch.float64)
    m.feature.denoise(x, torch.zeros_like(x))
    hook.remove()
    assert steps == [400, 300, 200, 100, 0]  # set_timesteps(2·5) over 1000 steps, second half


def test_diffkd_defaults_are_the_authors_and_options():
    from kdbench.methods.diffkd import DiffKD

    sig = inspect.signature(DiffKD.__init__).parameters
    got = {k: sig[k].default for k in sig if k not in ("self", "ctx")}
    assert got == {
        "layer": -1,
        "use_ae": True,
        "ae_channels": 1024,
        "tau": 1.0,
        "inference_steps": 5,
        "train_timesteps": 1000,
        "logits": True,
    }
    assert DiffKD.weights_for() == {"ce": 1.0, "diffkd": 1.0, "diffkd_logits": 1.0, "ddim": 1.0, "ae": 1.0}
    m = DiffKD(_ctx((8, 4, 4), (32, 4, 4)), ae_channels=None, logits=False)
    assert m.feature.ae is not None and m.feature.trans.out_channels == 16  # C_t // 2, the class default
    assert m.logit_unit is None and "logits" not in DiffKD.taps_for(logits=False).teacher
    terms = m(
        _feats(torch.randn(4, 8, 4, 4)), _feats(torch.randn(4, 32, 4, 4)), _batch(torch.zeros(4).long())
    )
    assert set(terms) == {"diffkd", "ddim", "ae"}
    assert DiffKD(_ctx((8, 4, 4), (32, 4, 4)), use_ae=False, logits=False).feature.ae is None
    with pytest.raises(ConfigError, match="feature map"):
        DiffKD(_ctx((8, 4, 4), (32,)))
    with pytest.raises(ConfigError, match="at least 8 channels"):
        DiffKD(_ctx((8, 4, 4), (32, 4, 4)), ae_channels=4)
    with pytest.raises(ConfigError, match="inference_steps"):
        DiffKD(_ctx((8, 4, 4), (32, 4, 4)), inference_steps=0)


@pytest.mark.parametrize("name", ["mgd", "diffkd"])
def test_maps_of_different_sizes_pool_the_larger_one(name):
    """Where the reference refuses (its maps must agree in H, W), the larger map is average-pooled."""
    from kdbench.methods.diffkd import DiffKD
    from kdbench.methods.mgd import MGD

    g = torch.Generator().manual_seed(0)
    big_s = torch.randn(4, 8, 8, 8, generator=g)
    t = torch.randn(4, 16, 4, 4, generator=g)
    z_s, z_t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    torch.manual_seed(0)
    m = (
        MGD(_ctx((8, 8, 8), (16, 4, 4)))
        if name == "mgd"
        else DiffKD(_ctx((8, 8, 8), (16, 4, 4)), ae_channels=8)
    )
    y = torch.zeros(4, dtype=torch.long)

    def run(f_s: torch.Tensor, f_t: torch.Tensor) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)
        return m(_feats(f_s, z_s), _feats(f_t, z_t), _batch(y))

    got = run(big_s, t)
    want = run(F.adaptive_avg_pool2d(big_s, 4), t)
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k])
    # and the teacher's map when it is the larger one
    got_t = run(t[:, :8], F.interpolate(t, scale_factor=2.0))
    for k, v in run(t[:, :8], t).items():
        torch.testing.assert_close(got_t[k], v)


# ----------------------------------------------------------------------------- registry, end to end


@pytest.mark.parametrize(
    "name,paper", [("mgd", "Yang et al., ECCV 2022"), ("diffkd", "Huang et al., NeurIPS 2023")]
)
def test_registered_with_their_paper(name, paper):
    from kdbench import registry

    assert name in registry.names("losses")
    assert registry.paper(registry.scan()["losses"][name].value) == paper


@pytest.mark.parametrize("name,params", [("mgd", {}), ("diffkd", {"ae_channels": 16})])
def test_trains_a_tiny_student_through_the_engine(name, params):
    """One epoch through the engine's training loop: finite losses, the method's modules learn."""
    from kdbench import registry
    from kdbench.features import FeatureReader, discover_taps, probe_features
    from kdbench.models.smallcnn import smallcnn
    from tests._train_method import train_method

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 16, 16, generator=g)
    y = torch.arange(32) % 4
    cls = registry.load("losses", name)
    taps = cls.taps_for(**params)

    def model(seed: int, width: int, wanted: tuple[str, ...]):
        torch.manual_seed(seed)
        net = smallcnn(4, 1, width)
        spec = discover_taps(net)
        return net, FeatureReader(net, spec, list(wanted)), probe_features(net, spec, x)

    student, s_reader, s_probe = model(1, 2, taps.student)
    teacher, t_reader, t_probe = model(2, 4, taps.teacher)
    teacher.eval()
    ctx = MethodContext(
        num_classes=4,
        num_train=32,
        epochs=1,
        batch_size=16,
        student_shapes=s_probe.shapes(),
        teacher_shapes=t_probe.shapes(),
    )
    method = cls(ctx, **params)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    train_method(method, params, student, s_reader, t_reader, x, y, epochs=1)
    # every weight of the method's modules learns (a conv's bias right before a train-mode BatchNorm
    # gets no gradient, in the reference too: the normalisation removes it)
    weights = [n for n in before if n.endswith("weight")]
    unchanged = [n for n in weights if torch.equal(before[n], dict(method.named_parameters())[n].detach())]
    assert weights and not unchanged, unchanged
