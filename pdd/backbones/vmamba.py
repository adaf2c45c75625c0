"""VMamba-Tiny "vanilla" v0, the PDD teacher: SS2D blocks without MLP, PatchMerging v1, channels-last.

Returns the four post-downsample stage features z1..z4 (B, C, H, W): 192@/8, 384@/16, 768@/32, 768@/32.
Parameter names follow the official release (``vssmtiny_dp01_ckpt_epoch_292.pth``); the legacy names of
older files and the current official code's names (``downsample.1`` / ``downsample.2``) are mapped on
load. Registered with timm, so ``timm.create_model("vmamba_tiny_v0")``
builds it.

Example::

    >>> import torch
    >>> from pdd.backbones import vmamba_tiny_v0
    >>> net = vmamba_tiny_v0().eval()
    >>> [tuple(f.shape) for f in net(torch.randn(1, 3, 64, 64))]
    [(1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2), (1, 768, 2, 2)]
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import timm.layers
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

from pdd.backbones.weights import WeightsError, check_and_load, load_checkpoint_file
from pdd.impl_names import canonical_scan_impl
from pdd.ss2d import SS2D_ROUTES, SS2DWeights, ss2d

__all__ = ["SS2D", "VMAMBA_V0_TINY_URL", "VSSBlock", "VSSMv0", "map_legacy_vmamba_keys", "vmamba_tiny_v0"]

VMAMBA_V0_TINY_URL = (
    "https://github.com/MzeroMiko/VMamba/releases/download/%2320240218/vssmtiny_dp01_ckpt_epoch_292.pth"
)

# Other checkpoint names -> the names used here: legacy files (VMamba release history), and the current
# official code, which holds PatchMerging's LayerNorm and Linear as ``downsample.1`` and ``downsample.2``.
_LEGACY = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)ln_1\."), r"\1norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)self_attention\."), r"\1op."),
    (re.compile(r"^(layers\.\d+\.downsample\.)1\."), r"\1norm."),
    (re.compile(r"^(layers\.\d+\.downsample\.)2\."), r"\1reduction."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)


def map_legacy_vmamba_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename legacy and current-official VMamba checkpoint keys to the names this module uses."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _LEGACY:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


class SS2D(nn.Module):
    """2-D selective scan (v0): in_proj → depthwise conv → SiLU → 4-route scan → LayerNorm → ·SiLU(z) → out_proj.

    Input and output (B, H, W, dim), channels-last. ``scan_impl`` names the four-route scan implementation
    (:func:`pdd.ss2d.ss2d`), fixed when the block is built.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, scan_impl: str = "eager") -> None:
        super().__init__()
        d_inner = expand * dim
        dt_rank = math.ceil(dim / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.scan_impl = canonical_scan_impl(scan_impl)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        self.x_proj_weight = nn.Parameter(torch.empty(SS2D_ROUTES, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(SS2D_ROUTES, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(SS2D_ROUTES, d_inner))
        self.A_logs = nn.Parameter(torch.empty(SS2D_ROUTES * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(SS2D_ROUTES * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation: S4D-real A, δ spread log-uniformly in [dt_min, dt_max]."""
        bound = 1.0 / math.sqrt(self.d_inner)
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(SS2D_ROUTES, self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        s4d_real = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32))
        self.A_logs.copy_(s4d_real.repeat(SS2D_ROUTES * self.d_inner, 1))
        self.Ds.fill_(1.0)

    def scan_weights(self) -> SS2DWeights:
        """The parameters the four-route scan reads (A = −exp(A_logs), fp32 as the scan kernels want)."""
        return SS2DWeights(self.x_proj_weight, self.dt_projs_weight, -torch.exp(self.A_logs.float()),
                           self.Ds.float(), self.dt_projs_bias.float().reshape(-1))

    def forward(self, x: Tensor) -> Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))                          # (B, d_inner, H, W)
        y = ss2d(x, self.scan_weights(), self.scan_impl)                         # (B, H, W, d_inner)
        y = self.out_norm(y)
        return self.out_proj(y * F.silu(z))


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LayerNorm(x))), channels-last; v0 has no MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, scan_impl: str = "eager") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, scan_impl=scan_impl)
        self.drop_path = timm.layers.DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.op(self.norm(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated as (0,0),(1,0),(0,1),(1,1) → LayerNorm(4C) → Linear 4C → 2C, channels-last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class VSSStage(nn.Module):
    def __init__(self, dim: int, depth: int, drop_paths: Sequence[float], downsample: bool, scan_impl: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, dp, scan_impl) for dp in drop_paths[:depth])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class VSSMv0(nn.Module):
    """VMamba v0 backbone returning each stage's output after its PatchMerging, channels-first."""

    def __init__(self, depths: Sequence[int] = (2, 2, 9, 2), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.2, scan_impl: str = "eager") -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=4, stride=4, bias=True),
            _ToChannelsLast(),
            nn.LayerNorm(dims[0]),
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.layers.append(VSSStage(dims[i], depth, rates[start:start + depth], i < len(depths) - 1, scan_impl))
            start += depth
        self.out_channels = (*(2 * d for d in dims[:-1]), dims[-1])
        self.apply(_init_weights)

    def set_scan_impl(self, impl: str) -> None:
        """Name the scan implementation of every SS2D block (an explicit choice, e.g. by a runtime)."""
        impl = canonical_scan_impl(impl)
        for m in self.modules():
            if isinstance(m, SS2D):
                m.scan_impl = impl

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"VMamba expects (B, 3, H, W) with H, W multiples of 32, got {tuple(x.shape)}")
        x = self.patch_embed(x)
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x.permute(0, 3, 1, 2).contiguous())
        return feats

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Legacy names are mapped wherever this module sits inside a larger model.
        local = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        state_dict.update({prefix + k: v for k, v in map_legacy_vmamba_keys(local).items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_checkpoint(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        """Load an official VMamba checkpoint (dict with "model", or a bare state dict); classifier ignored."""
        obj = load_checkpoint_file(path, allow_pickle=allow_pickle)
        state = obj.get("model", obj)
        if not isinstance(state, Mapping):
            raise WeightsError(f"weight file {path}: entry 'model' is a {type(state).__name__}, expected a state dict")
        check_and_load(self, map_legacy_vmamba_keys(state), f"weight file {path}", ignore=("classifier.",))


class _ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register_model
def vmamba_tiny_v0(weights: str | os.PathLike | None = None, pretrained: bool = False,
                   scan_impl: str = "eager", allow_pickle: bool = False, **kwargs) -> VSSMv0:
    """VMamba-Tiny v0 (depths 2,2,9,2; dims 96..768; d_state 16). ~22.9 M parameters with the classifier.

    ``weights``: None (random), a local checkpoint path, or ``"hub"`` (the official release file, needs
    network). ``pretrained=True`` (timm's flag) means ``weights="hub"``.
    """
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    net = VSSMv0(scan_impl=scan_impl, **kwargs)
    if pretrained and weights is None:
        weights = "hub"
    if weights == "hub":
        try:
            obj = torch.hub.load_state_dict_from_url(VMAMBA_V0_TINY_URL, map_location="cpu", weights_only=False)
        except Exception as exc:  # network errors come in many types
            raise WeightsError(
                f"could not download the VMamba-T v0 checkpoint from {VMAMBA_V0_TINY_URL} ({exc}); "
                f"download it elsewhere and pass its path"
            ) from exc
        check_and_load(net, map_legacy_vmamba_keys(obj.get("model", obj)), VMAMBA_V0_TINY_URL, ignore=("classifier.",))
    elif weights is not None:
        net.load_checkpoint(weights, allow_pickle=allow_pickle)
    return net
