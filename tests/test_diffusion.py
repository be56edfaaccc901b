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
from kdbench.diffusion.train import obtain_trained, train_unet  # noqa: E402
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


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    x, y = _data()
    full = train_unet(TINY, x, y, 3, tmp_path / "full")
    assert full is not None
    recipe = Recipe(**{**TINY.__dict__, "checkpoint_every": 1})
    assert train_unet(recipe, x, y, 3, tmp_path / "killed", stop_after=2) is None
    saved = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2
    resumed = train_unet(recipe, x, y, 3, tmp_path / "killed")
    assert resumed is not None
    for (k, a), b in zip(full.unet.state_dict().items(), resumed.unet.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


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
