"""The report's CNN (src/mnist_cnn/core/model.py): layers, parameter count, outputs, checkpoints, batching."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.core.model import Net, load_model, normalize, predict_log_probs, standardize, stretched, unstandardize


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def uint8_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_layers_are_the_reports(net: Net) -> None:
    children = [(name, m) for name, m in net.named_children() if not isinstance(m, nn.Identity)]
    assert [name for name, _ in children] == ["conv1", "conv2", "pool", "fc1", "fc2"]
    for conv, (c_in, c_out) in ((net.conv1, (1, 32)), (net.conv2, (32, 64))):
        assert isinstance(conv, nn.Conv2d)
        assert (conv.in_channels, conv.out_channels) == (c_in, c_out)
        assert conv.kernel_size == (3, 3)
        assert conv.padding == (1, 1)
        assert conv.stride == (1, 1)
        assert conv.bias is not None
    assert isinstance(net.pool, nn.MaxPool2d)
    assert net.pool.kernel_size == 2
    assert net.pool.stride == 2
    for fc, (f_in, f_out) in ((net.fc1, (12544, 128)), (net.fc2, (128, 10))):
        assert isinstance(fc, nn.Linear)
        assert (fc.in_features, fc.out_features) == (f_in, f_out)
        assert fc.bias is not None


def test_parameter_count(net: Net) -> None:
    conv1 = 32 * (1 * 3 * 3) + 32
    conv2 = 64 * (32 * 3 * 3) + 64
    fc1 = 128 * (64 * 14 * 14) + 128
    fc2 = 10 * 128 + 10
    assert conv1 + conv2 + fc1 + fc2 == 1_625_866
    assert sum(p.numel() for p in net.parameters()) == 1_625_866
    assert all(p.requires_grad for p in net.parameters())


def test_forward_is_the_reports_order(net: Net) -> None:
    # Conv ReLU, Conv ReLU, MaxPool 2, flatten, FC ReLU, FC, LogSoftmax: written out with the same weights.
    x = normalize(uint8_images(5))
    h = F.relu(F.conv2d(x, net.conv1.weight, net.conv1.bias, padding=1))
    h = F.relu(F.conv2d(h, net.conv2.weight, net.conv2.bias, padding=1))
    h = F.max_pool2d(h, 2)
    assert h.shape == (5, 64, 14, 14)
    h = F.relu(F.linear(h.flatten(1), net.fc1.weight, net.fc1.bias))
    expected = F.log_softmax(F.linear(h, net.fc2.weight, net.fc2.bias), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)
        maps = net.feature_maps(x)  # the refusal's features
        assert maps.shape == (5, 64, 14, 14)
        torch.testing.assert_close(torch.log_softmax(net.classify(maps), dim=1), expected)


def test_output_is_log_probabilities(net: Net) -> None:
    with torch.no_grad():
        out = net(normalize(uint8_images(16)))
    assert out.shape == (16, 10)
    assert out.dtype == torch.float32
    assert (out <= 0).all()
    torch.testing.assert_close(out.exp().sum(1), torch.ones(16))


def test_normalize_uses_the_mnist_statistics() -> None:
    pixels = torch.tensor([0, 255, 33], dtype=torch.uint8)
    expected = torch.tensor([(0.0 - 0.1307) / 0.3081, (1.0 - 0.1307) / 0.3081, (33 / 255 - 0.1307) / 0.3081])
    torch.testing.assert_close(normalize(pixels), expected)


def test_gradients_reach_every_parameter(net: Net) -> None:
    net.train()
    loss = F.nll_loss(net(normalize(uint8_images(4))), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("depth", [2, 3])
def test_channels_last_gives_the_same_gradients_as_nchw(depth: int) -> None:
    # bf16 trains channels_last, and the features' gradient is turned back to that layout
    # before max-pool's backward (a speed fix): the values must be those of NCHW (to float tolerance).
    torch.manual_seed(0)
    nchw = Net(depth=depth)
    fast = Net(depth=depth)
    fast.load_state_dict(nchw.state_dict())
    fast.to(memory_format=torch.channels_last)
    x = normalize(uint8_images(8))
    labels = torch.arange(8)
    for model, images in ((nchw, x), (fast, x.contiguous(memory_format=torch.channels_last))):
        F.nll_loss(model(images), labels).backward()
    assert fast.conv2.weight.grad.is_contiguous(memory_format=torch.channels_last)
    for (name, a), b in zip(nchw.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


# --- the report's proposed improvements (options, off by default) ---------------


def test_default_options_leave_the_reports_weights_only(net: Net) -> None:
    assert net.arch == {"batchnorm": False, "dropout": 0.0, "depth": 2}
    layers = ("conv1", "conv2", "fc1", "fc2")
    assert list(net.state_dict()) == [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]


def test_batchnorm_follows_each_conv_before_its_relu() -> None:
    torch.manual_seed(0)
    net = Net(batchnorm=True).eval()
    assert isinstance(net.norm1, nn.BatchNorm2d) and net.norm1.num_features == 32
    assert isinstance(net.norm2, nn.BatchNorm2d) and net.norm2.num_features == 64
    with torch.no_grad():
        net.norm1.running_mean.uniform_(-1, 1)  # non-trivial statistics, so that the order matters
        net.norm2.running_var.uniform_(0.5, 2)
        x = normalize(uint8_images(3))
        h = F.relu(net.norm1(net.conv1(x)))
        h = F.max_pool2d(F.relu(net.norm2(net.conv2(h))), 2)
        h = F.relu(net.fc1(h.flatten(1)))
        torch.testing.assert_close(net(x), F.log_softmax(net.fc2(h), dim=1))


def test_dropout_is_random_in_training_and_off_in_eval() -> None:
    net = Net(dropout=0.5)
    x = normalize(uint8_images(4))
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    assert net.drop_features.p == net.drop_hidden.p == 0.5


@pytest.mark.parametrize("batchnorm", [False, True])
def test_depth_3_adds_a_conv_block_and_a_pool_before_the_classifier(batchnorm: bool) -> None:
    torch.manual_seed(0)
    net = Net(batchnorm=batchnorm, depth=3).eval()
    conv3 = net.block3[0]
    assert (conv3.in_channels, conv3.out_channels, conv3.kernel_size, conv3.padding) == (64, 64, (3, 3), (1, 1))
    assert isinstance(net.block3[1], nn.BatchNorm2d if batchnorm else nn.Identity)
    assert net.fc1.in_features == 64 * 7 * 7
    bn = 2 * (32 + 64 + 64) if batchnorm else 0
    assert sum(p.numel() for p in net.parameters()) == 320 + 18_496 + 36_928 + 401_536 + 1_290 + bn
    x = normalize(uint8_images(3))
    h = F.relu(net.norm1(net.conv1(x)))
    h = F.max_pool2d(F.relu(net.norm2(net.conv2(h))), 2)
    h = F.max_pool2d(F.relu(net.block3[1](conv3(h))), 2)
    h = F.relu(net.fc1(h.flatten(1)))
    torch.testing.assert_close(net(x), F.log_softmax(net.fc2(h), dim=1))


def test_depth_2_draws_the_same_initial_weights_as_the_reports_layers() -> None:
    # The third block exists only at depth 3, so the report's model consumes the RNG as
    # four bare layers created in order do (an unconditional conv3 would change fc1 and fc2).
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(1, 32, 3, padding=1),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.Linear(12544, 128),
        nn.Linear(128, 10),
    ]
    torch.manual_seed(0)
    net = Net()
    for mine, bare in zip((net.conv1, net.conv2, net.fc1, net.fc2), layers, strict=True):
        assert torch.equal(mine.weight, bare.weight) and torch.equal(mine.bias, bare.bias)


@pytest.mark.parametrize("depth", [2, 3])
def test_width_multiplies_every_convs_channels_and_travels_with_the_weights(depth: int) -> None:
    net = Net(depth=depth, width=2, batchnorm=True).eval()
    convs = [net.conv1, net.conv2] + ([net.block3[0]] if depth == 3 else [])
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 64), (64, 128), (128, 128)][: len(convs)]
    assert net.norm2.num_features == 128
    assert net.fc1.in_features == 128 * (14 * 14 if depth == 2 else 7 * 7)
    x = normalize(uint8_images(3))
    assert net.feature_maps(x).shape[1] == 128 and net(x).shape == (3, 10)
    assert "width" not in Net().arch  # the report's checkpoint keeps its bytes
    rebuilt = Net(**net.arch)  # as load_model rebuilds it from the checkpoint
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), net(x))


def test_width_below_1_is_refused() -> None:
    with pytest.raises(ValueError, match="width >= 1"):
        Net(width=0)


def test_depth_other_than_2_or_3_is_refused() -> None:
    with pytest.raises(ValueError, match="depth must be 2 or 3"):
        Net(depth=4)


@pytest.mark.parametrize(
    "arch",
    [{"batchnorm": True, "dropout": 0.25, "depth": 2}, {"batchnorm": True, "dropout": 0.0, "depth": 3}],
    ids=["depth2", "depth3"],
)
def test_checkpoint_records_the_architecture(tmp_path: Path, arch: dict) -> None:
    torch.manual_seed(0)
    net = Net(**arch)
    net.train()
    net(normalize(uint8_images(8)))  # moves the BatchNorm running statistics
    path = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict(), "arch": net.arch}, path)
    loaded = load_model(str(path))
    assert loaded.arch == arch
    assert (loaded.block3 is not None) == (arch["depth"] == 3)
    assert torch.equal(loaded.norm2.running_mean, net.norm2.running_mean)
    images = uint8_images(5)
    torch.testing.assert_close(predict_log_probs(loaded, images, 5), predict_log_probs(net, images, 5), rtol=0, atol=0)


# --- checkpoints ------------------------------------------------------------------


def test_load_model_round_trip(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict(), "arch": net.arch, "epochs": 5}, path)
    loaded = load_model(str(path))
    assert isinstance(loaded, Net)
    assert not loaded.training
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    images = uint8_images(8)
    torch.testing.assert_close(predict_log_probs(loaded, images, 8), predict_log_probs(net, images, 8), rtol=0, atol=0)


def test_load_model_differs_from_a_fresh_net(tmp_path: Path, net: Net) -> None:
    # The round trip above would pass trivially if load_model ignored the file and the seed matched.
    torch.manual_seed(123)
    other = Net()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": other.state_dict(), "arch": other.arch}, path)
    loaded = load_model(str(path))
    assert torch.equal(loaded.fc2.weight, other.fc2.weight)
    assert not torch.equal(loaded.fc2.weight, net.fc2.weight)


class NotAWeight:
    """Anything that is not a tensor or a plain container: weights_only must refuse to unpickle it."""


def test_load_model_refuses_pickled_objects(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict(), "extra": NotAWeight()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(str(path))


def test_load_model_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": nn.Linear(3, 2).state_dict(), "arch": Net().arch}, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(str(path))


# --- batched prediction ---------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 7, 32, 33, 1000])
def test_predict_in_batches_equals_one_batch(net: Net, batch_size: int) -> None:
    images = uint8_images(33, seed=1)
    whole = predict_log_probs(net, images, batch_size=len(images))
    batched = predict_log_probs(net, images, batch_size=batch_size)
    assert batched.shape == (33, 10)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(whole, net(normalize(images)), rtol=1e-5, atol=1e-5)


def test_predict_puts_the_model_in_eval_mode_and_tracks_no_gradients(net: Net) -> None:
    net.train()
    out = predict_log_probs(net, uint8_images(3), batch_size=2)
    assert not net.training
    assert not out.requires_grad


def test_input_norm_range_makes_the_net_blind_to_brightness_and_contrast() -> None:
    torch.manual_seed(0)
    net = Net(input_norm="range").eval()
    pixels = torch.rand(6, 1, 28, 28)
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0.0, 1.0  # each image spans black..white
    grey_page = 0.5 + 0.5 * pixels  # a lifted background and half the contrast, as MNIST-C's brightness
    with torch.inference_mode():
        torch.testing.assert_close(net(standardize(grey_page)), net(standardize(pixels)), atol=1e-4, rtol=0)
        assert not torch.allclose(Net().eval()(standardize(grey_page)), Net().eval()(standardize(pixels)))
    assert "input_norm" not in Net().arch  # the report's checkpoint keeps its bytes
    assert Net(**net.arch).arch["input_norm"] == "range"  # as load_model rebuilds it from the checkpoint


def test_input_norm_background_removes_an_uneven_page_and_keeps_the_ink() -> None:
    stroke = torch.zeros(1, 1, 28, 28)
    stroke[..., 5:23, 14] = 1.0
    ramp = torch.linspace(0, 0.6, 28).expand(1, 1, 28, 28)  # a page darker on the left: a shadow, a fog
    on_page = (stroke + ramp).clamp(max=1)
    far = torch.ones(28, 28, dtype=torch.bool)
    far[:, 10:19] = False  # more than 4 pixels from the stroke
    seen = {
        mode: unstandardize(stretched(standardize(on_page), background=mode == "background"))[0, 0]
        for mode in ("range", "background")
    }
    assert seen["range"][far].max() > 0.5  # stretching alone keeps the shadow
    assert seen["background"][far].max() < 0.2  # the page is all but gone (a ramp leaves its slope near the edges)
    assert seen["background"][5:23, 14].min() > 0.8  # the ink is not
    # A uniformly lifted page is removed exactly, as by range.
    net = Net(input_norm="background").eval()
    with torch.inference_mode():
        torch.testing.assert_close(net(standardize(0.3 + 0.7 * stroke)), net(standardize(stroke)), atol=1e-4, rtol=0)
    assert Net(**net.arch).arch["input_norm"] == "background"
