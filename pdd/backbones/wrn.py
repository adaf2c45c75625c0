"""WRN50-2 teacher: timm ``wide_resnet50_2`` as a feature extractor of layer1..layer4.

Weights: timm ``racm_in1k`` (``wide_resnet50_racm-8234f177.pth``, the PDD authors') or torchvision
``IMAGENET1K_V1`` (``wide_resnet50_2-95faca4d.pth``, RD4AD's). Both files share parameter names.
"""

from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdd.backbones.weights import WeightsError, check_and_load, load_checkpoint_file

__all__ = ["TORCHVISION_WRN50_2_URL", "GemmConv2d", "plain_convs", "wide_resnet50_2_features"]

TORCHVISION_WRN50_2_URL = "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
HUB_NAMES = ("timm", "torchvision")
# Below this many unrolled input values per output position (K = cin·kh·kw against B·H_out·W_out), a CPU
# convolution stays with oneDNN; above it oneDNN spends most of each call reordering the weights.
GEMM_MIN_K_PER_POSITION = 32


class GemmConv2d(nn.Conv2d):
    """A Conv2d for eager runs that, on the CPU, runs as im2col and one GEMM when its weights outweigh its
    output (layer4 of WRN50-2: 1024·1024·3·3 weights for an 8x8 map at 256²).

    oneDNN reorders the weights on every call of an NCHW convolution; for those layers that costs more
    than the arithmetic (17 ms against 6 ms for the GEMM on 2 cores). Same parameters and checkpoints as
    Conv2d. A model built for graph export keeps plain Conv2d layers instead
    (``wide_resnet50_2_features(eager_gemm=False)``), which export as the Conv op.
    """

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> GemmConv2d:
        """A GemmConv2d with the hyperparameters of ``conv`` that shares its weight and bias tensors."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() != 4 or x.device.type != "cpu" or self.groups != 1
                or self.padding_mode != "zeros" or isinstance(self.padding, str)):
            return super().forward(x)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        b, _, h, w = x.shape
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.in_channels * kh * kw < GEMM_MIN_K_PER_POSITION * b * oh * ow:
            return super().forward(x)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)   # (B, cin·kh·kw, oh·ow)
        y = torch.matmul(self.weight.flatten(1), cols)
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.view(b, self.out_channels, oh, ow)


def _gemm_convs(net: nn.Module, eager_gemm: bool) -> nn.Module:
    """With ``eager_gemm``, put a :class:`GemmConv2d` sharing the weights in place of each plain Conv2d."""
    if eager_gemm:
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d:
                    setattr(parent, name, GemmConv2d.sharing(child))
    return net


def plain_convs(net: nn.Module) -> nn.Module:
    """The inverse of the eager form: a plain Conv2d sharing the weights in place of each GemmConv2d, in place
    (what graph tools such as a quantizer recognise as a convolution)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GemmConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                 child.padding, child.dilation, child.groups, child.bias is not None,
                                 child.padding_mode, device="meta")
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
    return net


def wide_resnet50_2_features(weights: str | os.PathLike | None = None, out_indices: tuple[int, ...] = (1, 2, 3, 4),
                             allow_pickle: bool = False, eager_gemm: bool = True) -> nn.Module:
    """WRN50-2 returning the outputs of layer1..layer4 (256, 512, 1024, 2048 channels at /4../32).

    ``weights``: None (random), a local file (timm or torchvision layout), ``"timm"`` (racm_in1k from the
    Hugging Face hub) or ``"torchvision"`` (IMAGENET1K_V1 from download.pytorch.org). ``eager_gemm``: the
    convolutions are :class:`GemmConv2d` (fast eager CPU runs); False keeps plain Conv2d (graph export).
    """
    if weights == "timm":
        try:
            return _gemm_convs(timm.create_model("wide_resnet50_2.racm_in1k", pretrained=True,
                                                 features_only=True, out_indices=out_indices), eager_gemm)
        except Exception as exc:  # hub errors come in many types
            raise WeightsError(
                f"could not fetch timm wide_resnet50_2.racm_in1k ({exc}); pass the local file "
                f"wide_resnet50_racm-8234f177.pth instead"
            ) from exc
    net = timm.create_model("wide_resnet50_2", pretrained=False, features_only=True, out_indices=out_indices)
    if weights == "torchvision":
        try:
            state = torch.hub.load_state_dict_from_url(TORCHVISION_WRN50_2_URL, map_location="cpu")
        except Exception as exc:
            raise WeightsError(
                f"could not download {TORCHVISION_WRN50_2_URL} ({exc}); pass the local file "
                f"wide_resnet50_2-95faca4d.pth instead"
            ) from exc
        check_and_load(net, state, TORCHVISION_WRN50_2_URL, ignore=("fc.",))
    elif weights is not None:
        check_and_load(net, load_checkpoint_file(weights, allow_pickle), f"weight file {weights}", ignore=("fc.",))
    return _gemm_convs(net, eager_gemm)
