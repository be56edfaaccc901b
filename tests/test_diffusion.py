"""kdbench.diffusion: local diffusers directories, the DDIM path, the cached default UNet."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from kdbench.artifacts import ArtifactCorrupt  # noqa: E402
from kdbench.diffusion import DDIMPath, DiffusionModel, Recipe, inspect_local, load_local, tiny_unet  # noqa: E402
from kdbench.diffusion.model import alphas_cumprod_from  # noqa: E402
from kdbench.diffusion.train import _build, _lr_factor, obtain_trained, train_unet  # noqa: E402
from kdbench.engine.train import (  # noqa: E402
    StopRequested,
    TimeLimitReached,
    clear_stop,
    request_stop,
    stop_requested,
    time_limit,
)
from kdbench.errors import ConfigError  # noqa: E402

TINY = Recipe(steps=4, batch_size=8, warmup=2, widths=(8, 16), checkpoint_every=100)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _data(n: int = 24, size: int = 16, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1, torch.randint(classes, (n,), generator=g)


class _PointMass(nn.Module):
    """The exact noise predictor of a distribution with all its mass on one image ``c``."""

    def __init__(self, c: torch.Tensor, alphas: torch.Tensor):
        super().__init__()
        self.c, self.alphas = c, alphas
        self.w = nn.Parameter(torch.zeros(()))  # a parameter, so DiffusionModel.device works
        self.config = SimpleNamespace(in_channels=c.shape[1], num_class_embeds=None)

    def forward(self, x, t, class_labels=None):
        a = self.alphas[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x - a.sqrt() * self.c) / (1 - a).sqrt())


def test_ddim_inverts_and_samples_exactly_with_an_exact_noise_predictor():
    alphas = alphas_cumprod_from({"num_train_timesteps": 1000})
    c = torch.rand(1, 1, 8, 8) * 2 - 1
    model = DiffusionModel(unet=_PointMass(c, alphas), alphas_cumprod=alphas)
    path = DDIMPath(model, steps=10, strength=0.6)
    assert path.levels == 6 and path.timesteps[0] == 0 and path.timesteps == sorted(path.timesteps)
    z = path.invert(c, None)
    a = path.alphas[-1]
    # at level K the latent of a point mass is sqrt(a) c (its noise is 0); the first inversion
    # step asks the model at timestep 0 (alpha 0.9999, not 1), the usual DDIM-inversion shortcut
    torch.testing.assert_close(z, a**0.5 * c, atol=0.01, rtol=0)
    torch.testing.assert_close(path.sample(z, None), c)
    # from any latent the sampler lands on the only image the model knows
    torch.testing.assert_close(path.sample(torch.randn(2, 1, 8, 8), None), c.expand(2, -1, -1, -1))


def test_checkpointed_sampler_gives_the_plain_gradient():
    torch.manual_seed(0)
    model = DiffusionModel(
        unet=tiny_unet(16, 1, 3, widths=(8, 16)), alphas_cumprod=alphas_cumprod_from({})
    ).to("cpu")
    path = DDIMPath(model, steps=6, strength=0.5)
    x, y = _data(4)
    y = y[:4]
    z0 = path.invert(x[:4], y)
    grads = []
    for ckpt in (True, False):
        z = z0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(path.sample(z, y, grad_checkpoint=ckpt).square().sum(), z)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
    assert all(p.grad is None for p in model.unet.parameters())


def test_local_pipeline_saved_with_save_pretrained_loads(tmp_path):
    import diffusers

    torch.manual_seed(0)
    unet = tiny_unet(16, 3, 5, widths=(8, 16))
    sched = diffusers.DDIMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    model = load_local(tmp_path / "pipe")
    assert model.num_train_timesteps == 200 and model.conditional and model.num_class_embeds == 5
    torch.testing.assert_close(model.alphas_cumprod, sched.alphas_cumprod.float())
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([1, 4])
    with torch.no_grad():
        want = unet.eval()(x, torch.tensor([7, 7]), class_labels=y).sample
        torch.testing.assert_close(model.eps(x, 7, y), want)
    model.check(in_channels=3, image_size=16, num_classes=5)
    with pytest.raises(ConfigError, match="3-channel images but the dataset has 1"):
        model.check(in_channels=1, image_size=16, num_classes=5)
    with pytest.raises(ConfigError, match="cannot take 17x17"):
        model.check(in_channels=3, image_size=17, num_classes=5)
    with pytest.raises(ConfigError, match="conditioned on 5 classes but the dataset has 10"):
        model.check(in_channels=3, image_size=16, num_classes=10)
    # a bare UNet folder (no scheduler) loads with DDPM's default schedule
    unet.save_pretrained(tmp_path / "bare")
    assert load_local(tmp_path / "bare").num_train_timesteps == 1000


def test_unsupported_or_missing_directories_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        inspect_local(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no diffusers model"):
        inspect_local(tmp_path / "empty")
    text = tmp_path / "sd"
    (text / "unet").mkdir(parents=True)
    (text / "model_index.json").write_text(
        json.dumps(
            {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
        )
    )
    # a Stable Diffusion pipeline is named for what it is, not only as an unknown component
    not_yet = r"text-conditional pipelines \(Stable Diffusion\) are not supported yet"
    with pytest.raises(ConfigError, match=r"component 'text_encoder' \(CLIPTextModel\): " + not_yet):
        inspect_local(text)
    (text / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    (text / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ConfigError, match="its UNet is a 'UNet2DConditionModel': " + not_yet):
        inspect_local(text)
    (text / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ConfigError, match="supports UNet2DModel"):
        inspect_local(text)


def _plain_ddpm_loop(recipe: Recipe, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: DDPM training written out (AdamW, warm-up then cosine per step, one
    generator drawing indices, timesteps and noise), as kdbench trained before the engine's
    trainer ran it; a model keyed by an unchanged recipe must keep these exact weights."""
    unet = _build(recipe, x.shape[-1], x.shape[1], 3).unet.train()
    ac = alphas_cumprod_from(recipe.scheduler_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(recipe, s))
    gen = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.steps):
        idx = torch.randint(len(x), (recipe.batch_size,), generator=gen)
        t = torch.randint(recipe.timesteps, (recipe.batch_size,), generator=gen)
        noise = torch.randn((recipe.batch_size, *x.shape[1:]), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x[idx] + (1 - a).sqrt() * noise
        cond = y[idx] if recipe.class_conditional else None
        loss = torch.nn.functional.mse_loss(unet(x_t, t, class_labels=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return unet.state_dict()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("conditional", [True, False])
def test_trainer_gives_the_weights_of_the_plain_ddpm_loop(tmp_path, conditional):
    x, y = _data()
    recipe = Recipe(**{**TINY.__dict__, "steps": 5, "class_conditional": conditional})
    model = train_unet(recipe, x, y, 3, tmp_path)
    assert model is not None and model.source["final_loss"] > 0 and model.source["train_s"] > 0
    _assert_same_weights(model.unet.state_dict(), _plain_ddpm_loop(recipe, x, y))
    assert not (tmp_path / "checkpoint.pt").exists()  # the last step saves none (obtain_trained saves)


@pytest.mark.parametrize(("every", "stop_after"), [(1, 2), (100, 3), (2, 3)])
def test_killed_training_resumes_to_the_same_weights(tmp_path, every, stop_after):
    x, y = _data()
    full = train_unet(TINY, x, y, 3, tmp_path / "full")
    assert full is not None
    recipe = Recipe(**{**TINY.__dict__, "checkpoint_every": every})
    assert train_unet(recipe, x, y, 3, tmp_path / "killed", stop_after=stop_after) is None
    assert not stop_requested()
    saved = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert saved["stage"] == "diffusion" and saved["epoch"] == stop_after  # one step per epoch
    assert saved["trainer"]["hooks"]["diffusion"]["loss"] > 0
    resumed = train_unet(recipe, x, y, 3, tmp_path / "killed")
    assert resumed is not None
    _assert_same_weights(full.unet.state_dict(), resumed.unet.state_dict())
    assert resumed.source["final_loss"] == full.source["final_loss"]


def test_stop_request_and_time_limit_checkpoint_the_diffusion_training(tmp_path):
    x, y = _data()
    full = train_unet(TINY, x, y, 3, tmp_path / "full")
    assert full is not None
    request_stop()  # SIGTERM's handler, as a cell that trains the model meets it
    try:
        with pytest.raises(StopRequested, match="diffusion epoch 1 step 0"):
            train_unet(TINY, x, y, 3, tmp_path / "stopped")
    finally:
        clear_stop()
    with time_limit(0), pytest.raises(TimeLimitReached):
        train_unet(TINY, x, y, 3, tmp_path / "stopped")
    assert (tmp_path / "stopped" / "checkpoint.pt").exists()
    resumed = train_unet(TINY, x, y, 3, tmp_path / "stopped")
    assert resumed is not None
    _assert_same_weights(full.unet.state_dict(), resumed.unet.state_dict())


def test_checkpoint_of_the_earlier_loop_restarts_the_training(tmp_path):
    x, y = _data()
    full = train_unet(TINY, x, y, 3, tmp_path / "full")
    assert full is not None
    (tmp_path / "old").mkdir()
    old = {"unet": {}, "opt": {}, "sched": {}, "gen": torch.Generator().get_state(), "step": 2}
    torch.save(old, tmp_path / "old" / "checkpoint.pt")
    again = train_unet(TINY, x, y, 3, tmp_path / "old")
    assert again is not None
    _assert_same_weights(full.unet.state_dict(), again.unet.state_dict())


def test_two_users_share_one_trained_model(tmp_path):
    x, y = _data()
    out: list = [None, None]

    def user(i: int) -> None:
        out[i] = obtain_trained(TINY, x, y, 3, tmp_path)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (m1, r1), (m2, r2) = out
    assert sorted([r1["trained_here"], r2["trained_here"]]) == [False, True]
    assert r1["key"] == r2["key"] and r1["train_s"] > 0
    assert len(list((tmp_path / "diffusion").glob("*/model.pt"))) == 1
    for a, b in zip(m1.unet.state_dict().values(), m2.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # other data is another model; a damaged cache file is refused, not trusted
    _, r3 = obtain_trained(TINY, x.flip(-1), y, 3, tmp_path)
    assert r3["key"] != r1["key"] and r3["trained_here"]
    weights = tmp_path / "diffusion" / r1["key"] / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactCorrupt, match="train the diffusion model again"):
        obtain_trained(TINY, x, y, 3, tmp_path)


def test_recipe_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown diffusion recipe key"):
        Recipe.from_params({"stepz": 3})
    with pytest.raises(ConfigError, match="beta_schedule"):
        Recipe.from_params({"beta_schedule": "cosine"})
    assert Recipe.from_params({"widths": [8, 16, 32]}).downsample() == 4


def test_latent_model_with_its_vae_loads_inverts_and_decodes(tmp_path):
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    tiny_unet(8, 4, None, widths=(8, 16)).save_pretrained(tmp_path / "ldm" / "unet")
    vae.save_pretrained(tmp_path / "ldm" / "vae")
    diffusers.DDIMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "ldm" / "scheduler")
    model = load_local(tmp_path / "ldm")
    assert model.vae is not None and model.image_channels == 3 and not model.conditional
    model.check(in_channels=3, image_size=16, num_classes=10)
    with pytest.raises(ConfigError, match="cannot take 9x9 inputs"):
        model.check(in_channels=3, image_size=18, num_classes=10)
    path = DDIMPath(model, steps=4, strength=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = path.invert(x, None)
    assert z.shape == (2, 4, 8, 8)
    z.requires_grad_(True)
    out = path.sample(z, None)
    assert out.shape == x.shape
    (g,) = torch.autograd.grad(out.sum(), z)
    assert g.abs().sum() > 0
