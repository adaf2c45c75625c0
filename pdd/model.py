"""The PDD network (export-safe ``nn.Module``): frozen teachers, adapters, prior, students, anomaly head.

Data flow (input 256², shapes scale with the input; any multiple of 32 works)::

    WRN50-2 teacher    y1 256@/4   y2 512@/8   y3 1024@/16  y4 2048@/32
    VMamba-T teacher   z1 192@/8   z2 384@/16  z3 768@/32   z4 768@/32
    InA   t_l = Up2(A_l(z_l)) + y_l,  l = 1..3           distillation targets
    MMU   u   = A_4(z4) + y4                              input of both students
    MPA   p16, p32 = priors at y3's and y2's sizes
    prior student P   a3 = D1(u);  a2 = D2(a3 + p16);  a1 = D3(a2 + p32)
    plain student U   b3 = D1(u);  b2 = D2(b3);        b1 = D3(b2)
    map = Σ_l up(1 − cos(a_l, t_l)) + Σ_l up(1 − cos(b_l, t_l)), Gaussian σ;  score = max(map)

Example::

    >>> import torch
    >>> from pdd import PDDConfig, build_pdd
    >>> model = build_pdd(PDDConfig(image_size=64)).eval()
    >>> out = model(torch.randn(2, 3, 64, 64))
    >>> out.pred_score.shape, out.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 64, 64]))
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdd.anomaly import anomaly_head
from pdd.backbones import vmamba_tiny_v0, wide_resnet50_2_features
from pdd.calibration import Calibration
from pdd.config import PDDConfig
from pdd.int8 import QUANTIZED, Int8Calibration, Int8Error, quantized_teacher
from pdd.precision import FP32, SCAN_FP32_PARAMETERS, STAGES, ModelPrecision
from pdd.ssm import resolve_scan_impl

__all__ = [
    "Adapter",
    "DecoderStage",
    "InterLevelAdapter",
    "ManifoldPriorAffine",
    "ManifoldUnification",
    "PDDFeatures",
    "PDDModel",
    "PDDOutput",
    "TeacherFeatures",
    "Teachers",
    "UpConv2x2",
    "build_pdd",
    "head_pairs",
]

log = logging.getLogger(__name__)

WRN_CHANNELS = (256, 512, 1024, 2048)
VMAMBA_CHANNELS = (192, 384, 768, 768)


class PDDOutput(NamedTuple):
    """Eval result: ``pred_score`` (B,) float32 and ``anomaly_map`` (B, H, W) float32, smoothed."""

    pred_score: Tensor
    anomaly_map: Tensor


class TeacherFeatures(NamedTuple):
    """Frozen-teacher outputs: WRN ``y`` (4 maps) and VMamba ``z`` (4 maps), each (B, C, H, W)."""

    y: tuple[Tensor, ...]
    z: tuple[Tensor, ...]


class PDDFeatures(NamedTuple):
    """Training view: targets t1..t3, prior student a1..a3, plain student b1..b3 (level 1 first)."""

    targets: tuple[Tensor, Tensor, Tensor]
    prior: tuple[Tensor, Tensor, Tensor]
    plain: tuple[Tensor, Tensor, Tensor]


def _bn_conv(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout))


class Adapter(nn.Module):
    """A(in→out): GELU(BN(1x1) ∘ GELU ∘ BN(3x3, dilation 2) ∘ GELU ∘ BN(1x1) + 1x1 residual), mid = max(in, out)/4."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = max(cin, cout) // 4
        self.main = nn.Sequential(
            _bn_conv(cin, mid), nn.GELU(), _bn_conv(mid, mid, 3, dilation=2), nn.GELU(), _bn_conv(mid, cout)
        )
        self.residual = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.main(x) + self.residual(x))


class InterLevelAdapter(nn.Module):
    """InA: t_l = Up2(A_l(z_l)) + y_l for l = 1..3 — the fused distillation targets."""

    def __init__(self, vmamba_channels: tuple[int, ...] = VMAMBA_CHANNELS,
                 wrn_channels: tuple[int, ...] = WRN_CHANNELS) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(Adapter(cz, cy) for cz, cy in zip(vmamba_channels[:3], wrn_channels[:3]))

    def forward(self, y: tuple[Tensor, ...], z: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(
            F.interpolate(a(zl), size=yl.shape[-2:], mode="bilinear", align_corners=True) + yl
            for a, zl, yl in zip(self.adapters, z, y)
        )


class ManifoldUnification(nn.Module):
    """MMU: u = A_4(z4) + y4, the unified manifold both students start from."""

    def __init__(self, cz: int = VMAMBA_CHANNELS[3], cy: int = WRN_CHANNELS[3]) -> None:
        super().__init__()
        self.adapter = Adapter(cz, cy)

    def forward(self, y4: Tensor, z4: Tensor) -> Tensor:
        return self.adapter(z4) + y4


class ManifoldPriorAffine(nn.Module):
    """MPA: h = GELU(BN(1x1 (u))); priors p_deep = resize(1x1 (h)) at level 3, p_mid at level 2.

    Target sizes come from the feature shapes, so every input size divisible by 32 works.
    """

    def __init__(self, cu: int = 2048, hidden: int = 1024, c_deep: int = 1024, c_mid: int = 512) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(cu, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU())
        self.to_deep = nn.Conv2d(hidden, c_deep, 1, bias=False)
        self.to_mid = nn.Conv2d(hidden, c_mid, 1, bias=False)

    def forward(self, u: Tensor, deep_size: tuple[int, int], mid_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        h = self.embed(u)
        p_deep = F.interpolate(self.to_deep(h), size=deep_size, mode="bilinear", align_corners=False)
        p_mid = F.interpolate(self.to_mid(h), size=mid_size, mode="bilinear", align_corners=False)
        return p_deep, p_mid


class UpConv2x2(nn.ConvTranspose2d):
    """2x2 transposed convolution of stride 2 (no bias); with ``eager_gemm`` run as one GEMM and a pixel shuffle.

    The 2x2 windows of a stride-2 deconvolution do not overlap, so each input pixel maps to its own 2x2
    output block: (4·cout × cin) @ (cin × HW), then the blocks moved into place. That is the same sum
    as ``conv_transpose2d`` and 2–4x faster on CPUs, whose deconvolution kernels are slow. A model built
    for graph export (``eager_gemm=False``) keeps the ConvTranspose op, which graph runtimes implement well.
    """

    def __init__(self, cin: int, cout: int, eager_gemm: bool = True) -> None:
        super().__init__(cin, cout, 2, stride=2, bias=False)
        self.eager_gemm = eager_gemm

    def forward(self, x: Tensor) -> Tensor:
        if not self.eager_gemm or x.dim() != 4:
            return super().forward(x)
        b, _, h, w = x.shape
        y = torch.matmul(self.weight.flatten(1).t(), x.flatten(2))          # (B, cout·2·2, H·W)
        y = y.view(b, self.out_channels, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(b, self.out_channels, 2 * h, 2 * w)


class DecoderBlock(nn.Module):
    """Reverse-distillation bottleneck: 1x1 → BN → ReLU → (2x2 deconv s2 | 3x3) → BN → ReLU → 1x1 → BN, + shortcut."""

    def __init__(self, cin: int, width: int, cout: int, upsample: bool, eager_gemm: bool = True) -> None:
        super().__init__()
        mid = (UpConv2x2(width, width, eager_gemm) if upsample
               else nn.Conv2d(width, width, 3, padding=1, bias=False))
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            mid, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = (nn.Sequential(UpConv2x2(cin, cout, eager_gemm), nn.BatchNorm2d(cout))
                         if upsample else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class DecoderStage(nn.Sequential):
    """D_k: ``blocks`` bottlenecks (width_per_group 128), the first upsampling x2: cin@s → cout@2s."""

    def __init__(self, cin: int, cout: int, blocks: int = 2, eager_gemm: bool = True) -> None:
        width = cout // 2  # planes = cout / 4, wide: width = planes · 128 / 64
        super().__init__(*[DecoderBlock(cin if i == 0 else cout, width, cout, upsample=i == 0, eager_gemm=eager_gemm)
                           for i in range(blocks)])


class StudentDecoder(nn.Module):
    """D1 2048→1024, D2 1024→512, D3 512→256 (each doubling the resolution)."""

    def __init__(self, blocks: int = 2, eager_gemm: bool = True) -> None:
        super().__init__()
        self.d1 = DecoderStage(2048, 1024, blocks, eager_gemm)
        self.d2 = DecoderStage(1024, 512, blocks, eager_gemm)
        self.d3 = DecoderStage(512, 256, blocks, eager_gemm)


def _init_trainable(m: nn.Module) -> None:
    # As the authors' (and RD4AD's) code: Kaiming for Conv2d only; ConvTranspose2d keeps PyTorch's default.
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Teachers(nn.Module):
    """Both frozen teachers; always in eval mode, never trained, run without autograd."""

    def __init__(self, wrn: nn.Module, vmamba: nn.Module) -> None:
        super().__init__()
        self.wrn, self.vmamba = wrn, vmamba
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teachers:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherFeatures:
        return TeacherFeatures(tuple(self.wrn(images)), tuple(self.vmamba(images)))


class PDDModel(nn.Module):
    """PDD: frozen WRN50-2 + VMamba-T teachers, InA/MMU/MPA, prior and plain students, anomaly head.

    ``forward(images)`` with images (B, 3, H, W) ImageNet-normalised: in training mode returns
    :class:`PDDFeatures` for the loss; in eval mode :class:`PDDOutput`. ``graph``: build the layer forms
    that export well (ConvTranspose instead of the eager GEMM of :class:`UpConv2x2`). ``precision``: what the
    model computes in (:meth:`to_precision`); each stage's input is cast to the policy's dtype at its entry.
    """

    def __init__(self, cfg: PDDConfig, teachers: Teachers, graph: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.teachers = teachers
        self.ina = InterLevelAdapter()
        self.mmu = ManifoldUnification()
        self.mpa = ManifoldPriorAffine()
        self.prior_student = StudentDecoder(cfg.decoder_blocks, eager_gemm=not graph)
        # The authors run one decoder twice; the paper's figure draws two students.
        self.plain_student = (self.prior_student if cfg.shared_decoder
                              else StudentDecoder(cfg.decoder_blocks, eager_gemm=not graph))
        for part in (self.ina, self.mmu, self.mpa, self.prior_student, self.plain_student):
            part.apply(_init_trainable)
        # The operating point (pdd.calibration), set after training or by `pdd calibrate`; None until then.
        self.calibration: Calibration | None = None
        # The int8 quantization's observed state (pdd.int8), set by `pdd calibrate --precision int8` or a loader.
        self.quantization: Int8Calibration | None = None
        self.precision = FP32

    def to_precision(self, precision: ModelPrecision, compile_int8: bool = True) -> PDDModel:
        """Compute in ``precision`` from now on: every stage's weights cast once, in place, to the dtype
        :data:`pdd.precision.POLICY` gives it (the scan's A, D and δ bias stay fp32; the head has no weights
        and computes in fp32). Inference only; a reduced-precision model is not cast again.

        int8: the teachers of :data:`pdd.int8.QUANTIZED` are replaced by their quantized graphs, built from
        :attr:`quantization`; native int8 compiles each by itself unless ``compile_int8`` is False (the caller
        compiles the whole model, the quantized graphs with it)."""
        if precision == self.precision:
            return self
        if self.precision != FP32:
            raise ValueError(f"the model already computes in {self.precision.describe()}: load it again in fp32 "
                             f"to cast it to {precision.describe()}")
        if precision.name == "int8":
            return self._quantize(precision, native=compile_int8 and not precision.emulate)
        for group in ("vmamba.", "head."):  # cast as one module / computed by one function
            dtypes = {precision.dtype(s) for s in STAGES if s.startswith(group)}
            if len(dtypes) != 1 or (group == "vmamba." and precision.dtype("wrn") not in dtypes):
                raise ValueError(f"{precision.name}: the model casts its input once for both teachers, VMamba as "
                                 f"one module and the head as one function; the policy gives {group}* "
                                 f"{sorted(map(str, dtypes))} and WRN {precision.dtype('wrn')}")
        self.eval().requires_grad_(False)
        precision.cast_module(self.teachers.wrn, "wrn")
        precision.cast_module(self.teachers.vmamba, "vmamba.proj", keep_fp32=SCAN_FP32_PARAMETERS)
        for part in (self.ina, self.mmu, self.mpa):
            precision.cast_module(part, "fusion")
        for part in (self.prior_student, self.plain_student):  # the same module when the decoder is shared
            precision.cast_module(part, "students")
        self.precision = precision
        return self

    def _quantize(self, precision: ModelPrecision, native: bool) -> PDDModel:
        if self.quantization is None:
            raise Int8Error("int8 needs the model's int8 calibration (its quantizer's observations of normal "
                            "images): run `pdd calibrate --checkpoint CKPT --data DIR --precision int8`")
        self.eval().requires_grad_(False)
        for name in QUANTIZED:
            setattr(self.teachers, name, quantized_teacher(getattr(self.teachers, name), name, self.quantization,
                                                           self.cfg.image_size, native))
        self.precision = precision
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("teachers.")]

    def set_scan_impl(self, impl: str) -> None:
        """Name the SS2D scan implementation of the VMamba teacher (see :func:`pdd.ss2d.ss2d`)."""
        self.teachers.vmamba.set_scan_impl(impl)

    def students(self, y: tuple[Tensor, ...], z: tuple[Tensor, ...]) -> PDDFeatures:
        """The trainable part, from teacher features (so cached features can be used in training)."""
        y, z = (tuple(self.precision.cast(t, "fusion") for t in feats) for feats in (y, z))
        targets = self.ina(y, z)
        u = self.mmu(y[3], z[3])
        p_deep, p_mid = self.mpa(u, targets[2].shape[-2:], targets[1].shape[-2:])
        P, U = self.prior_student, self.plain_student
        a3 = P.d1(u)
        b3 = a3 if self.cfg.shared_decoder else U.d1(u)  # shared: D1(u) computed once
        a2 = P.d2(a3 + p_deep)
        a1 = P.d3(a2 + p_mid)
        b2 = U.d2(b3)
        b1 = U.d3(b2)
        return PDDFeatures(targets, (a1, a2, a3), (b1, b2, b3))

    def features(self, images: Tensor) -> PDDFeatures:
        self._check_images(images)
        return self.students(*self.teachers(self.precision.cast(images, "wrn")))

    def head(self, feats: PDDFeatures, image_size: tuple[int, int]) -> PDDOutput:
        p = self.precision
        pairs = [(p.cast(t, "head.cosine"), p.cast(s, "head.cosine")) for t, s in head_pairs(feats)]
        amap, score = anomaly_head(pairs, image_size, sigma=self.cfg.sigma, impl=self.cfg.head_impl,
                                   dtype=p.dtype("head.cosine"))
        return PDDOutput(p.cast(score, "head.max").float(), p.cast(amap, "head.blur").float())

    def forward(self, images: Tensor) -> PDDFeatures | PDDOutput:
        feats = self.features(images)
        if self.training:
            return feats
        return self.head(feats, (images.shape[-2], images.shape[-1]))

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"PDD expects images (B, 3, H, W), got {shape}")
        if images.shape[0] == 0:
            raise ValueError("PDD got an empty batch (B = 0)")
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"PDD needs H and W divisible by 32, got {tuple(images.shape[-2:])}")
        if not images.is_floating_point():
            raise ValueError(f"PDD expects float images (ImageNet-normalised), got {images.dtype}")


def head_pairs(feats: PDDFeatures) -> list[tuple[Tensor, Tensor]]:
    """The anomaly head's (teacher target, student) pairs: prior student levels 1..3, then plain student 1..3."""
    return [(t, s) for branch in (feats.prior, feats.plain) for t, s in zip(feats.targets, branch)]


def build_pdd(cfg: PDDConfig | None = None, device: torch.device | str = "cpu", graph: bool = False,
              teacher_weights: bool = True) -> PDDModel:
    """Build PDD from its config: teachers with their weights (random if None), fresh trainable parts.

    What the model is built for is said here, not found out later: the SS2D scan implementation is
    ``cfg.scan_impl`` (``auto`` resolved for ``device``; ScanImplUnavailable if it cannot run here);
    ``graph=True`` builds the layer forms that export as standard ops (Conv, ConvTranspose) instead of the
    eager CPU GEMMs; ``teacher_weights=False`` skips reading the teachers' weight files, for a caller that
    loads a full state dict next (``load_state_dict(..., assign=True)``).
    """
    cfg = (cfg or PDDConfig()).validate()
    if cfg.model != "pdd":
        raise ValueError(f"build_pdd builds model 'pdd', the config asks for {cfg.model!r}")
    scan = resolve_scan_impl(cfg.scan_impl, device)
    wrn_weights, vmamba_weights = (cfg.wrn_weights, cfg.vmamba_weights) if teacher_weights else (None, None)
    teachers = Teachers(wide_resnet50_2_features(wrn_weights, eager_gemm=not graph),
                        vmamba_tiny_v0(vmamba_weights, scan_impl=scan))
    if teacher_weights and (cfg.wrn_weights is None or cfg.vmamba_weights is None):
        random_init = [n for n, w in (("WRN50-2", cfg.wrn_weights), ("VMamba-T", cfg.vmamba_weights)) if w is None]
        log.warning("PDD teachers: %s randomly initialised (no weights given); scores are not meaningful",
                    " and ".join(random_init))
    return PDDModel(cfg, teachers, graph=graph).to(device)
