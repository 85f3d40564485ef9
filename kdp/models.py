"""Models: CIFAR ResNets (He et al. 2016) and the paper's convolutional autoencoder purifier.
The baseline purifiers of an honest Table 1 are declared with their configs and training in
kdp.baselines, one module each; their `register()` fills kdp.defenses.REGISTRY, which
`build_model` reads. Importing kdp.baselines registers them all; every kdp module that loads
checkpoints or reads the registry imports it (tests/test_layout.py), so only a script that
uses this module alone must import it to rebuild a baseline.

Every model takes images in [0, 1]. Classifiers normalize inside `forward`; purifiers
return images in [0, 1]. Models are built from registries of factories by name, so a
checkpoint's JSON ({"name", "kwargs"}) is enough to rebuild one.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from kdp.defenses import REGISTRY as DEFENSES
from kdp.errors import ConfigError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # projection shortcut, as in pytorch-cifar-models
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images, three stages of widths (w, 2w, 4w); input in [0, 1]."""

    def __init__(self, depth: int = 56, width: int = 16, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"ResNet depth must be 6n+2 >= 8, got {depth}")
        n = (depth - 2) // 6
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """The last stage's feature map (B, 4w, 8, 8): NRP's feature space, SOAP's trunk."""
        return self.blocks(self.stem((x - self.mean) / self.std))

    def head(self, f):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))

    def forward(self, x):
        return self.head(self.features(x))


def _block(conv: nn.Module, c: int, relu: bool = True) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(c), *([nn.ReLU()] if relu else []))


class ConvAutoencoder(nn.Module):
    """The paper's purifier: `depth` Conv-BN-ReLU encoder blocks, `depth` ConvT-BN-ReLU decoder
    blocks with U-Net-like skips, and a tanh at the end (paper Sec. 3.1, Fig. 1).

    Layout follows REDNet30 (Mao et al. 2016), which the paper's inspiration (Kalaria et al.
    2022) uses: width 64, 3x3 kernels; the first conv has stride 2 (32->16) and the last
    ConvT maps back to 3 channels with stride 2 (16->32). The feature maps after encoder
    convs 2, 4, ..., 2k (k = ceil(depth / 2) - 1 skips) are added, mirrored (the last one
    first), to the outputs of the deconvs i with depth + i even: for depth 15, deconvs 1, 3,
    ..., 13 (counting from 1); for an even depth, deconvs 2, 4, .... Each sum is followed by a ReLU. Unlike REDNet30, the input is not added to the output
    (the paper does not mention it).

    head: "literal" (default) is the paper's text read literally: the last block is
    ConvT-BN-ReLU, then tanh, so the output lies in [0, 1). "affine" makes the last block
    ConvT-BN and maps (tanh + 1) / 2, an output in (0, 1) that can also go dark.
    """

    def __init__(self, depth: int = 15, width: int = 64, head: str = "literal"):
        super().__init__()
        if depth < 1 or width < 1:
            raise ConfigError(f"ConvAutoencoder needs depth >= 1 and width >= 1, got {depth}, {width}")
        if head not in ("literal", "affine"):
            raise ConfigError(f"unknown head {head!r}; valid: literal, affine")
        self.depth, self.head = depth, head
        self.n_skips = max(0, -(-depth // 2) - 1)  # ceil(depth / 2) - 1, as in REDNet
        enc = [_block(nn.Conv2d(3, width, 3, 2, 1), width)]
        enc += [_block(nn.Conv2d(width, width, 3, 1, 1), width) for _ in range(depth - 1)]
        dec = [_block(nn.ConvTranspose2d(width, width, 3, 1, 1), width) for _ in range(depth - 1)]
        last = nn.ConvTranspose2d(width, 3, 3, 2, 1, output_padding=1)
        dec.append(_block(last, 3, relu=head == "literal"))
        self.encoder, self.decoder = nn.ModuleList(enc), nn.ModuleList(dec)
        self.tanh = nn.Tanh()

    def forward(self, x):
        feats = []
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            if (i + 1) % 2 == 0 and len(feats) < self.n_skips:
                feats.append(x)
        for i, layer in enumerate(self.decoder):
            x = layer(x)
            if (i + 1 + self.depth) % 2 == 0 and feats:
                x = F.relu(x + feats.pop())
        x = self.tanh(x)
        return x if self.head == "literal" else (x + 1) / 2


class Purified(nn.Module):
    """purifier then classifier, as one model an attack can target end to end.

    Starts in eval mode without touching its children: torchattacks restores a model it
    found in train mode with .train(), which would flip the frozen purifier and classifier.
    """

    def __init__(self, purifier: nn.Module, classifier: nn.Module):
        super().__init__()
        self.purifier, self.classifier = purifier, classifier
        self.training = False

    def forward(self, x):
        return self.classifier(self.purifier(x))


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y on the forward pass, identity on the backward pass: BPDA (Athalye et al. 2018) with
    the identity as the differentiable approximation of a purifier x -> y."""
    return x + (y - x).detach()


class EOT(nn.Module):
    """Expectation over Transformation (Athalye et al. 2018): the mean of `samples` forward
    passes' logits, so an attack's gradient is an average over the defense's randomness."""

    def __init__(self, model: nn.Module, samples: int):
        super().__init__()
        if samples < 1:
            raise ConfigError(f"EOT needs samples >= 1, got {samples}")
        self.model, self.samples = model, samples
        self.training = False  # as Purified: never flip the wrapped model's mode

    def forward(self, x):
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": partial(CifarResNet, depth=8),  # not in He et al.; for tests and smoke runs
    "resnet20": partial(CifarResNet, depth=20),
    "resnet32": partial(CifarResNet, depth=32),
    "resnet44": partial(CifarResNet, depth=44),
    "resnet56": partial(CifarResNet, depth=56),
}
PURIFIERS: dict[str, Callable[..., nn.Module]] = {"cae": ConvAutoencoder, "none": nn.Identity}


def lookup(registry: dict, name: str, what: str):
    """registry[name], or a ValueError that lists the valid names."""
    if name not in registry:
        raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]


def build_model(kind: str, name: str, **kwargs) -> nn.Module:
    """Build a model from its registry kind ('classifier' or 'purifier'), name and kwargs; a
    baseline purifier from its registered declaration (kdp.defenses)."""
    registries = {"classifier": CLASSIFIERS, "purifier": {**PURIFIERS, **{n: d.purifier for n, d in DEFENSES.items()}}}
    if kind == "purifier" and name not in registries["purifier"] and not DEFENSES:
        raise ConfigError(f"unknown purifier {name!r}: no baseline is registered in this process; "
                          "`import kdp.baselines` registers them")
    return lookup(lookup(registries, kind, "model kind"), name, kind)(**kwargs)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: for the classifier and teachers once trained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
