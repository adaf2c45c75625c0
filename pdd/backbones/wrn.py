"""WRN50-2 teacher: timm ``wide_resnet50_2`` as a feature extractor of layer1..layer4.

Weights: timm ``racm_in1k`` (``wide_resnet50_racm-8234f177.pth``, the PDD authors') or torchvision
``IMAGENET1K_V1`` (``wide_resnet50_2-95faca4d.pth``, RD4AD's). Both files share parameter names.
"""

from __future__ import annotations

import os

import timm
import torch
from torch import nn

from pdd.backbones.weights import WeightsError, check_and_load, load_checkpoint_file

__all__ = ["TORCHVISION_WRN50_2_URL", "wide_resnet50_2_features"]

TORCHVISION_WRN50_2_URL = "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
HUB_NAMES = ("timm", "torchvision")


def wide_resnet50_2_features(weights: str | os.PathLike | None = None, out_indices: tuple[int, ...] = (1, 2, 3, 4),
                             allow_pickle: bool = False) -> nn.Module:
    """WRN50-2 returning the outputs of layer1..layer4 (256, 512, 1024, 2048 channels at /4../32).

    ``weights``: None (random), a local file (timm or torchvision layout), ``"timm"`` (racm_in1k from the
    Hugging Face hub) or ``"torchvision"`` (IMAGENET1K_V1 from download.pytorch.org).
    """
    if weights == "timm":
        try:
            return timm.create_model("wide_resnet50_2.racm_in1k", pretrained=True, features_only=True,
                                     out_indices=out_indices)
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
    return net
