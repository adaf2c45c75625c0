"""Frozen teachers: VMamba-Tiny v0 (written here, registered with timm) and WRN50-2 (timm)."""

from pdd.backbones.vmamba import VSSMv0, map_legacy_vmamba_keys, vmamba_tiny_v0
from pdd.backbones.weights import WeightsError, check_and_load, load_checkpoint_file
from pdd.backbones.wrn import wide_resnet50_2_features

__all__ = [
    "VSSMv0",
    "WeightsError",
    "check_and_load",
    "load_checkpoint_file",
    "map_legacy_vmamba_keys",
    "vmamba_tiny_v0",
    "wide_resnet50_2_features",
]
