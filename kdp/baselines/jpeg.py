"""JPEG re-encoding (Dziugaite et al. 2016, "A study of the effect of JPG compression on
adversarial images"; Guo et al. 2018, "Countering Adversarial Images using Input
Transformations"). Nothing to learn: its stage writes the checkpoint as is."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kdp.config import require
from kdp.defenses import Defense, register
from kdp.errors import ConfigError
from kdp.models import straight_through


@dataclass(frozen=True)
class JpegConfig:
    """Baseline: JPEG re-encoding (no training; a stage still writes its checkpoint)."""
    quality: int = 75
    """libjpeg quality in [1, 100] (75: Guo et al. 2018's middle setting)."""

    def __post_init__(self):
        require(1 <= self.quality <= 100, f"JpegConfig.quality must be in [1, 100], got {self.quality}")


class JpegPurifier(nn.Module):
    """JPEG re-encoding at `quality` (Dziugaite et al. 2016; Guo et al. 2018), via torchvision's
    libjpeg on CPU; images are quantized to uint8 first. Not differentiable: gradients pass by
    BPDA (identity). Deterministic."""
    backward = "bpda"

    def __init__(self, quality: int = 75):
        super().__init__()
        if not 1 <= quality <= 100:
            raise ConfigError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality

    def forward(self, x):
        from torchvision.io import decode_jpeg, encode_jpeg

        u8 = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        out = torch.stack(decode_jpeg(encode_jpeg(list(u8), quality=self.quality)))
        return straight_through(x, out.to(x.device, x.dtype) / 255)


register(Defense("jpeg", "JPEG", JpegConfig, JpegPurifier, cost=0.0))
