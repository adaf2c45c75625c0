"""RD4AD (reverse distillation), the baseline the paper compares with, built from the same parts.

WRN50-2 layers 1..3 as teacher; OCBE bottleneck (levels 1 and 2 brought to /16 by stride-2 convs,
concatenated with level 3 → 3072@/16, one ResNet layer of 3 bottlenecks stride 2 → 2048@/32); a
decoder of 3/4/6 blocks; loss Σ_l mean_b (1 − cos(vec S_l, vec T_l)); the same anomaly head.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdd.anomaly import anomaly_head
from pdd.backbones import wide_resnet50_2_features
from pdd.calibration import Calibration
from pdd.config import PDDConfig
from pdd.model import DecoderStage, PDDModel, PDDOutput, _init_trainable, build_pdd

__all__ = ["OCBE", "RD4ADModel", "build_model", "build_rd4ad", "rd4ad_loss"]

log = logging.getLogger(__name__)

RD4AD_DECODER_BLOCKS = (3, 4, 6)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Bottleneck(nn.Module):
    """Wide ResNet bottleneck (width = 2·planes), optional stride-2 projection shortcut."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        width, cout = planes * 2, planes * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class OCBE(nn.Module):
    """One-class bottleneck embedding: (y1, y2, y3) → 2048@/32."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.level1 = nn.Sequential(_conv_bn_relu(256, 512), _conv_bn_relu(512, 1024))
        self.level2 = _conv_bn_relu(512, 1024)
        self.fuse = nn.Sequential(
            *[_Bottleneck(3072 if i == 0 else 2048, 512, 2 if i == 0 else 1) for i in range(blocks)]
        )

    def forward(self, y: tuple[Tensor, ...]) -> Tensor:
        return self.fuse(torch.cat([self.level1(y[0]), self.level2(y[1]), y[2]], dim=1))


class RD4ADModel(nn.Module):
    """Reverse distillation: frozen WRN50-2, OCBE, one student decoder. Same outputs as :class:`PDDModel`."""

    def __init__(self, cfg: PDDConfig, wrn: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = wrn.requires_grad_(False).eval()
        self.bottleneck = OCBE()
        self.d1 = DecoderStage(2048, 1024, RD4AD_DECODER_BLOCKS[0])
        self.d2 = DecoderStage(1024, 512, RD4AD_DECODER_BLOCKS[1])
        self.d3 = DecoderStage(512, 256, RD4AD_DECODER_BLOCKS[2])
        for part in (self.bottleneck, self.d1, self.d2, self.d3):
            part.apply(_init_trainable)
        self.calibration: Calibration | None = None  # as PDDModel.calibration

    def train(self, mode: bool = True) -> RD4ADModel:
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("teacher.")]

    def features(self, images: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """(teacher y1..y3, student s1..s3)."""
        PDDModel._check_images(images)
        with torch.no_grad():
            y = tuple(self.teacher(images))[:3]
        s3 = self.d1(self.bottleneck(y))
        s2 = self.d2(s3)
        s1 = self.d3(s2)
        return y, (s1, s2, s3)

    def forward(self, images: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | PDDOutput:
        y, s = self.features(images)
        if self.training:
            return y, s
        amap, score = anomaly_head(list(zip(y, s)), tuple(images.shape[-2:]), sigma=self.cfg.sigma,
                                   impl=self.cfg.head_impl)
        return PDDOutput(score, amap)


def rd4ad_loss(y: tuple[Tensor, ...], s: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """Σ_l mean_b (1 − cos(vec S_l, vec T_l))."""
    loss = sum((1 - F.cosine_similarity(t.flatten(1).float(), st.flatten(1).float(), dim=1)).mean()
               for t, st in zip(y, s))
    return {"loss": loss}


def build_rd4ad(cfg: PDDConfig, device: torch.device | str = "cpu") -> RD4ADModel:
    cfg = cfg.validate()
    return RD4ADModel(cfg, wide_resnet50_2_features(cfg.wrn_weights, out_indices=(1, 2, 3))).to(device)


def build_model(cfg: PDDConfig, device: torch.device | str = "cpu", quiet: bool = False, graph: bool = False
                ) -> nn.Module:
    """PDD or RD4AD, as ``cfg.model`` says. ``quiet`` silences the random-teacher warning (checkpoint loads);
    ``graph``: PDD in its graph layer forms (:func:`pdd.model.build_pdd`)."""
    logger = logging.getLogger("pdd.model")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        return build_pdd(cfg, device, graph=graph) if cfg.model == "pdd" else build_rd4ad(cfg, device)
    finally:
        logger.setLevel(level)
