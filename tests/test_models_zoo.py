"""The CIFAR model zoo and the external model sources (torchvision, timm, Hugging Face).

Parameter counts are the reference ones (RepDistiller's ``models/``, num_classes=100), counted
exactly from its definitions; they are the "#Params" of the KD literature's CIFAR-100 tables.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points

import pytest
import torch
from torch import nn

from kdbench.errors import ConfigError, PluginError
from kdbench.features import FeatureReader, discover_taps
from kdbench.models._common import count_params, taps_from_params
from kdbench.models.external import hf_model, timm_model, torchvision_model
from kdbench.models.shufflenetv2 import channel_shuffle

#: name -> (parameters at num_classes=100, stage channels, stage sizes at 32×32, pooled dim)
ZOO: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int]] = {
    "resnet8": (83_892, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "resnet14": (181_108, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "resnet20": (278_324, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "resnet32": (472_756, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "resnet44": (667_188, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "resnet56": (861_620, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "resnet110": (1_736_564, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "resnet8x4": (1_233_540, (32, 64, 128, 256), (32, 32, 16, 8), 256),
    "resnet32x4": (7_433_860, (32, 64, 128, 256), (32, 32, 16, 8), 256),
    "resnet50": (23_705_252, (64, 256, 512, 1024, 2048), (32, 32, 16, 8, 4), 2048),
    "wrn_16_1": (180_916, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "wrn_16_2": (703_284, (16, 32, 64, 128), (32, 32, 16, 8), 128),
    "wrn_40_1": (569_780, (16, 16, 32, 64), (32, 32, 16, 8), 64),
    "wrn_40_2": (2_255_156, (16, 32, 64, 128), (32, 32, 16, 8), 128),
    "vgg8": (3_965_028, (64, 128, 256, 512, 512), (32, 16, 8, 4, 4), 512),
    "vgg11": (9_277_284, (64, 128, 256, 512, 512), (32, 16, 8, 4, 4), 512),
    "vgg13": (9_462_180, (64, 128, 256, 512, 512), (32, 16, 8, 4, 4), 512),
    "vgg16": (14_774_436, (64, 128, 256, 512, 512), (32, 16, 8, 4, 4), 512),
    "vgg19": (20_086_692, (64, 128, 256, 512, 512), (32, 16, 8, 4, 4), 512),
    "mobilenetv2": (812_836, (16, 12, 16, 48, 160), (16, 16, 8, 4, 2), 1280),
    "shufflev1": (949_258, (24, 240, 480, 960), (32, 16, 8, 4), 960),
    "shufflev2": (1_355_528, (24, 116, 232, 464), (32, 16, 8, 4), 1024),
}

ALL_TAPS = ["logits", "stages", "preact", "pooled"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 forwards gain nothing from threads; on a busy machine idle threads spin for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _factory(name: str):
    (ep,) = [e for e in entry_points(group="kdbench.models") if e.name == name]
    return ep.load()


def _check_preact(name: str, model: nn.Module, stages: list, preact: list) -> None:
    """Each pre-activation tap holds the value the stage's final activation was applied to."""
    relu = torch.relu
    # the stem: the input of its ReLU (WRN's stem has none: its pre-activation is the stem output)
    first = stages[0] if name.startswith("wrn") else relu(preact[0])
    torch.testing.assert_close(first, stages[0])
    for i in range(1, len(stages)):
        if name.startswith("wrn"):  # pre-activation blocks: the BN the next block applies to the stage
            bn = {1: model.block2.layer[0].bn1, 2: model.block3.layer[0].bn1, 3: model.bn1}[i]
            torch.testing.assert_close(preact[i], bn(stages[i]))
        elif name == "mobilenetv2":  # linear bottlenecks: the stage output is its own pre-activation
            torch.testing.assert_close(preact[i], stages[i])
        elif name == "shufflev2":  # ReLU, then the channel shuffle
            torch.testing.assert_close(channel_shuffle(relu(preact[i])), stages[i])
        else:
            torch.testing.assert_close(relu(preact[i]), stages[i])
        assert name == "mobilenetv2" or (preact[i] < 0).any(), "pre-activation read after a ReLU"


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model(name: str) -> None:
    params, channels, sizes, pooled_dim = ZOO[name]
    factory = _factory(name)
    torch.manual_seed(0)

    model = factory(num_classes=100, in_channels=3).eval()
    assert count_params(model) == params
    spec = model.kd_taps
    assert discover_taps(model) is spec
    assert len(spec.preact) == len(spec.stages) and all(spec.preact)
    with torch.no_grad():
        feats = FeatureReader(model, spec, ALL_TAPS).read(torch.randn(2, 3, 32, 32))
    assert isinstance(feats.logits, torch.Tensor) and feats.logits.shape == (2, 100)
    assert [f.shape[1] for f in feats.stages] == list(channels)
    assert [f.shape[-1] for f in feats.stages] == list(sizes)
    assert [f.shape for f in feats.preact] == [f.shape for f in feats.stages]
    assert feats.pooled.shape == (2, pooled_dim)
    torch.testing.assert_close(model.get_submodule(spec.classifier)(feats.pooled), feats.logits)
    with torch.no_grad():
        _check_preact(name, model, feats.stages, feats.preact)

    gray = factory(num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        feats = FeatureReader(gray, gray.kd_taps, ALL_TAPS).read(torch.randn(2, 1, 28, 28))
    assert feats.logits.shape == (2, 10)
    assert [f.shape[1] for f in feats.stages] == list(channels)
    assert feats.pooled.shape == (2, pooled_dim)


def test_zoo_parameter_names_follow_the_reference() -> None:
    """Checkpoints of the reference implementation load: a few of its parameter names."""
    expected = {
        "resnet8x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.bias"],
        "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.weight"],
        "vgg13": ["block0.0.bias", "block0.4.running_mean", "block4.3.weight", "classifier.weight"],
        "mobilenetv2": ["conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.bias", "classifier.0.weight"],
        "shufflev2": ["layer1.0.conv5.weight", "layer3.3.bn3.bias", "conv2.weight", "linear.weight"],
    }
    for name, keys in expected.items():
        state = _factory(name)(num_classes=100).state_dict()
        assert set(keys) <= set(state), name


# --------------------------------------------------------------------------- torchvision


def test_torchvision_resnet18_discovered_taps() -> None:
    model = torchvision_model(10, name="resnet18").eval()
    assert model.kd_taps.stages == ("relu", "layer1", "layer2", "layer3", "layer4")
    assert model.kd_taps.classifier == "fc"
    with torch.no_grad():
        reader = FeatureReader(model, model.kd_taps, ["logits", "stages", "pooled"])
        feats = reader.read(torch.randn(2, 3, 32, 32))
    assert feats.logits.shape == (2, 10)
    assert [f.shape[1] for f in feats.stages] == [64, 64, 128, 256, 512]
    assert feats.pooled.shape == (2, 512)


def test_torchvision_mobilenet_v2_discovered_taps_gray_28() -> None:
    model = torchvision_model(10, 1, name="mobilenet_v2").eval()
    assert len(model.kd_taps.stages) == 19 and model.kd_taps.classifier == "classifier.1"
    with torch.no_grad():
        reader = FeatureReader(model, model.kd_taps, ["logits", "stages", "pooled"])
        feats = reader.read(torch.randn(2, 1, 28, 28))
    assert feats.logits.shape == (2, 10)
    assert feats.stages[-1].shape[1] == 1280 and feats.pooled.shape == (2, 1280)


def test_torchvision_local_weights(tmp_path) -> None:
    torch.manual_seed(0)
    source = torchvision_model(10, name="resnet18")
    path = tmp_path / "resnet18.pt"
    torch.save({"model": source.state_dict()}, path)
    ref = source.state_dict()

    same = torchvision_model(10, name="resnet18", weights=str(path))
    for k, v in same.state_dict().items():
        torch.testing.assert_close(v, ref[k])

    # another number of classes: the body loads, the head is new
    other = torchvision_model(5, name="resnet18", weights=str(path))
    assert other.fc.out_features == 5
    torch.testing.assert_close(other.layer4[1].conv2.weight, ref["layer4.1.conv2.weight"])

    # one input channel: the RGB stem filters are folded into one
    gray = torchvision_model(10, 1, name="resnet18", weights=str(path))
    assert gray.conv1.in_channels == 1
    torch.testing.assert_close(gray.conv1.weight[:, 0], ref["conv1.weight"].sum(1))
    torch.testing.assert_close(gray.fc.weight, ref["fc.weight"])


def test_torchvision_missing_weights_file(tmp_path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ConfigError, match="nowhere.pt.*not a file"):
        torchvision_model(10, name="resnet18", weights=str(missing))


def test_torchvision_checkpoint_of_another_architecture(tmp_path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(torchvision_model(10, name="resnet18").state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        torchvision_model(10, name="resnet34", weights=str(path))


def test_torchvision_unknown_name() -> None:
    with pytest.raises(ConfigError, match="did you mean.*resnet18"):
        torchvision_model(10, name="resnet-18")


def test_taps_from_the_grid() -> None:
    model = torchvision_model(10, name="resnet18")
    taps = {"stages": ["layer3", "layer4"], "preact": ["", "layer4.1.relu"], "classifier": "fc"}
    spec = torchvision_model(10, name="resnet18", taps=taps).kd_taps
    assert spec.stages == ("layer3", "layer4") and spec.preact == ("", "layer4.1.relu")
    with pytest.raises(ConfigError, match="no module named 'layer9'"):
        taps_from_params(model, {"stages": ["layer9"]})
    with pytest.raises(ConfigError, match="unknown keys"):
        taps_from_params(model, {"stage": ["layer1"]})
    with pytest.raises(ConfigError, match="one preact path per stage"):
        taps_from_params(model, {"stages": ["layer1", "layer2"], "preact": ["layer1"]})


# --------------------------------------------------------------------------- timm and Hugging Face

HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_timm_missing_says_how_to_install() -> None:
    with pytest.raises(PluginError, match=r"pip install 'kdbench\[timm\]'"):
        timm_model(10, name="resnet18")


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install 'kdbench[timm]')")
def test_timm_model_with_local_checkpoint(tmp_path) -> None:
    source = timm_model(7, name="resnet18")
    path = tmp_path / "timm_r18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = timm_model(10, 1, name="resnet18", checkpoint_path=str(path)).eval()
    assert model.kd_taps.classifier == "fc"
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_hf_missing_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        hf_model(10, path=str(tmp_path / "no-such-checkpoint"))


@pytest.mark.skipif(HAS_TRANSFORMERS, reason="transformers is installed")
def test_hf_missing_transformers_says_how_to_install(tmp_path) -> None:
    with pytest.raises(PluginError, match=r"pip install 'kdbench\[hf\]'"):
        hf_model(10, path=str(tmp_path))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'kdbench[hf]')")
def test_hf_local_vit_checkpoint(tmp_path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path)
    model = hf_model(10, path=str(tmp_path)).eval()
    assert model.kd_taps.classifier == "model.classifier"
    with torch.no_grad():
        feats = FeatureReader(model, model.kd_taps, ["logits", "pooled"]).read(torch.randn(2, 3, 32, 32))
        assert feats.logits.shape == (2, 10) and feats.pooled.shape == (2, 32)
        gray = hf_model(10, 1, path=str(tmp_path), input_size=32).eval()
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)
