"""kdp.models: the paper's autoencoder layout, CIFAR ResNets, registries and freeze."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.models import (CIFAR_MEAN, CIFAR_STD, CLASSIFIERS, BasicBlock, CifarResNet, ConvAutoencoder, Purified,
                        build_model, freeze)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def layer_counts(m: nn.Module) -> Counter:
    return Counter(type(x).__name__ for x in m.modules())


# ----------------------------------------------------------------------------- autoencoder


def test_paper_autoencoder_layout():
    m = ConvAutoencoder()
    c = layer_counts(m)
    assert c["Conv2d"] == 15 and c["ConvTranspose2d"] == 15
    assert c["BatchNorm2d"] == 30 and c["Tanh"] == 1
    assert c["ReLU"] == 30  # literal head: every block is X-BN-ReLU, the last one too
    assert m.n_skips == 7
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    deconvs = [x for x in m.modules() if isinstance(x, nn.ConvTranspose2d)]
    assert all(x.kernel_size == (3, 3) for x in convs + deconvs)
    assert convs[0].in_channels == 3 and convs[0].stride == (2, 2)
    assert all(x.stride == (1, 1) and x.out_channels == 64 for x in convs[1:])
    assert deconvs[-1].out_channels == 3 and deconvs[-1].stride == (2, 2)
    assert all(x.out_channels == 64 for x in deconvs[:-1])


def test_affine_head_drops_last_relu():
    assert layer_counts(ConvAutoencoder(head="affine"))["ReLU"] == 29


@pytest.mark.parametrize("head", ["literal", "affine"])
@pytest.mark.parametrize("train", [True, False])
def test_autoencoder_output_range(head, train):
    torch.manual_seed(0)
    m = ConvAutoencoder(depth=4, width=8, head=head).train(train)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (4, 3, 32, 32)
    assert bool(torch.isfinite(y).all())
    if head == "literal":
        assert y.min().item() >= 0.0 and y.max().item() < 1.0
        assert (y == 0).any()  # the ReLU before tanh clips: exact zeros occur
    else:
        assert y.min().item() > 0.0 and y.max().item() < 1.0
        assert (y < 0.5).any() and (y > 0.5).any()


def test_literal_head_cannot_go_dark_affine_can():
    """With a very negative last BN bias, literal gives exactly 0 (ReLU then tanh) and
    affine gives values near, but above, 0."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    for head in ("literal", "affine"):
        m = ConvAutoencoder(depth=2, width=4, head=head).eval()
        with torch.no_grad():
            m.decoder[-1][1].bias.fill_(-3.0)
            y = m(x)
        if head == "literal":
            assert torch.equal(y, torch.zeros_like(y))
        else:
            assert 0 < y.min().item() and y.max().item() < 0.1


@pytest.mark.parametrize("depth,skips", [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2), (15, 7)])
def test_skip_count(depth, skips):
    assert ConvAutoencoder(depth=depth, width=2).n_skips == skips


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_small_depths_work_and_train(depth):
    torch.manual_seed(0)
    m = ConvAutoencoder(depth=depth, width=4, head="affine")
    x = torch.rand(2, 3, 32, 32)
    y = m(x)
    assert y.shape == (2, 3, 32, 32)
    F.mse_loss(y, x).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_skip_connection_is_added():
    """Depth 3 has one skip: encoder conv 2's map is added to decoder deconv 1's output
    (mirrored), followed by a ReLU, before the last deconv."""
    torch.manual_seed(0)
    m = ConvAutoencoder(depth=3, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    m.encoder[1].register_forward_hook(lambda mod, i, o: seen.__setitem__("skip", o))
    m.decoder[0].register_forward_hook(lambda mod, i, o: seen.__setitem__("dec0", o))
    m.decoder[1].register_forward_pre_hook(lambda mod, args: seen.__setitem__("in1", args[0]))
    with torch.no_grad():
        m(x)
    assert torch.allclose(seen["in1"], F.relu(seen["dec0"] + seen["skip"]))
    assert not torch.allclose(seen["in1"], seen["dec0"])


def test_autoencoder_argument_errors():
    with pytest.raises(ValueError, match="depth >= 1"):
        ConvAutoencoder(depth=0)
    with pytest.raises(ValueError, match="literal, affine"):
        ConvAutoencoder(head="sigmoid")


# ----------------------------------------------------------------------------- ResNets


def test_resnet_param_counts():
    counts = {d: n_params(CifarResNet(depth=d)) for d in (20, 32, 44, 56)}
    assert counts[20] < counts[32] < counts[44] < counts[56]
    # projection-shortcut variant (pytorch-cifar-models): 0.27M and 0.86M
    assert counts[20] == 272_474
    assert counts[56] == 855_770
    assert sum(isinstance(m, BasicBlock) for m in CifarResNet(depth=56).modules()) == 27


def test_resnet_output_and_depth_check():
    m = CifarResNet(depth=8, width=4)
    assert m(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    assert CifarResNet(depth=8, width=4, num_classes=7)(torch.rand(1, 3, 32, 32)).shape == (1, 7)
    for bad in (6, 9, 21):
        with pytest.raises(ValueError, match="6n\\+2"):
            CifarResNet(depth=bad)


def test_resnet_normalizes_inside():
    torch.manual_seed(0)
    m = CifarResNet(depth=8, width=4).eval()
    assert torch.allclose(m.mean.flatten(), torch.tensor(CIFAR_MEAN))
    assert torch.allclose(m.std.flatten(), torch.tensor(CIFAR_STD))
    assert "mean" in m.state_dict() and "std" in m.state_dict()  # buffers, saved with the weights
    assert all(p.data_ptr() != m.mean.data_ptr() for p in m.parameters())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
        h = m.blocks(m.stem((x - mean) / std))
        manual = m.fc(h.mean(dim=(2, 3)))
        assert torch.allclose(out, manual, atol=1e-5)
        m.mean.zero_()
        m.std.fill_(1.0)
        assert not torch.allclose(m(x), out, atol=1e-3)


# ----------------------------------------------------------------------------- registry, freeze


def test_build_model_registry():
    m = build_model("classifier", "resnet8", width=4)
    assert isinstance(m, CifarResNet)
    assert sum(isinstance(x, BasicBlock) for x in m.modules()) == 3
    p = build_model("purifier", "cae", depth=2, width=4, head="affine")
    assert isinstance(p, ConvAutoencoder) and p.depth == 2 and p.head == "affine"
    assert set(CLASSIFIERS) >= {"resnet20", "resnet32", "resnet44", "resnet56"}


def test_build_model_unknown_names():
    with pytest.raises(ValueError) as e:
        build_model("classifier", "vgg")
    assert "'vgg'" in str(e.value) and "resnet56" in str(e.value) and "resnet20" in str(e.value)
    with pytest.raises(ValueError) as e:
        build_model("detector", "yolo")
    assert "classifier" in str(e.value) and "purifier" in str(e.value)


def test_freeze():
    m = CifarResNet(depth=8, width=4).train()
    assert m.training and all(p.requires_grad for p in m.parameters())
    out = freeze(m)
    assert out is m
    assert not any(x.training for x in m.modules())
    assert not any(p.requires_grad for p in m.parameters())
    # eval mode: BN uses running stats, so a sample's output does not depend on its batch
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(m(x)[:1], m(x[:1]), atol=1e-5)


def test_purified_composes():
    torch.manual_seed(0)
    p = ConvAutoencoder(depth=2, width=4).eval()
    c = CifarResNet(depth=8, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(Purified(p, c)(x), c(p(x)))
        assert not torch.allclose(Purified(p, c)(x), c(x))
