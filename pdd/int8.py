"""int8: PDD with its WRN teacher statically quantized (torchao's PT2E flow), every other stage in fp32.

Which stages are quantized is :data:`pdd.precision.POLICY`'s int8 row (:data:`QUANTIZED`): the WRN teacher, the
bulk of the FLOPs, with per-channel s8 weights and u8 activations (``X86InductorQuantizer``'s default
configuration); the VMamba teacher, the fusion, the students and the head stay fp32.

Quantization has two steps, so that a model is quantized once, on images, and rebuilt anywhere without them:

1. :func:`observe` exports the teacher (``torch.export``, batch dynamic), inserts the quantizer's observers
   and runs normal training images through it. The observers' state (activation histograms, weight ranges)
   is the int8 calibration, :class:`Int8Calibration`, stored in the checkpoint (``pdd calibrate --precision
   int8``; a few hundred KB).
2. :func:`quantized_teacher` exports the teacher again, loads that state into the same observers and converts:
   the teacher's convolutions become quantize, int8 convolution, dequantize. No image is needed, and the result
   is the same for the same weights, state and torch.

The quantized teacher runs in one of two ways, chosen by the caller (:class:`Int8Teacher`): *native*, compiled
by inductor with frozen weights, where the quantize/conv/dequantize patterns become oneDNN's int8 convolutions
(compiled on the first call of each batch size); or *emulated*, the converted graph run eagerly, its quantized
values computed in fp32 (the numbers of int8 products summed in int32, up to summation order; slow). A model
that is compiled whole (``torch:cpu_kernel:compile:int8``) takes the emulated form and compiles it with the rest.

Example::

    >>> from pdd.int8 import observe
    >>> model.quantization = observe(model, normal_images, source="train split")   # doctest: +SKIP
    >>> model.to_precision(ModelPrecision("int8"))                                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn

from pdd.backbones.wrn import plain_convs
from pdd.precision import POLICY

__all__ = ["QUANTIZED", "Int8Calibration", "Int8Error", "Int8Teacher", "observe", "quantized_teacher"]

# The teachers the int8 policy quantizes (PDDModel.teachers attributes).
QUANTIZED = tuple(name for name, stage in (("wrn", "wrn"), ("vmamba", "vmamba.proj"))
                  if POLICY["int8"][stage].dtype == "int8")
# Observers that prepare_pt2e inserts are submodules with this name prefix; their buffers are the calibration.
_OBSERVER = "activation_post_process_"


class Int8Error(RuntimeError):
    """int8 cannot be built: no quantization, or one made for another graph (the message says what to run)."""


@dataclass
class Int8Calibration:
    """The quantizer's observed state for each quantized teacher: ``observers[teacher][buffer name]``, with what
    it was observed on and the library versions whose graphs it fits."""

    observers: dict[str, dict[str, Tensor]]
    images: int
    source: str
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"observers": self.observers, "images": self.images, "source": self.source,
                "versions": self.versions}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Int8Calibration:
        try:
            observers = {str(t): {str(k): v for k, v in state.items()} for t, state in data["observers"].items()}
            if not all(isinstance(v, Tensor) for state in observers.values() for v in state.values()):
                raise TypeError("observer state must be tensors")
            return cls(observers, int(data["images"]), str(data["source"]), dict(data.get("versions") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Int8Error(f"{where}: the int8 quantization record is damaged ({exc}); run `pdd calibrate "
                            f"--precision int8` again") from exc


def _versions() -> dict[str, str]:
    import torchao

    return {"torch": torch.__version__.split("+")[0], "torchao": torchao.__version__}


def _plain_convs(teacher: nn.Module) -> nn.Module:
    """A structural copy of ``teacher`` sharing its weights, in its plain-Conv2d form."""
    return plain_convs(copy.deepcopy(teacher, {id(t): t for t in (*teacher.parameters(), *teacher.buffers())})).eval()


def _prepared(teacher: nn.Module, image_size: int) -> torch.fx.GraphModule:
    """``teacher`` exported with a dynamic batch and its observers inserted (torchao PT2E)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    except ImportError as exc:
        raise Int8Error(f"int8 needs torchao (pip install 'pdd-medad[int8]'): {exc}") from exc
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.inference_mode():
        exported = torch.export.export(_plain_convs(teacher), (example,),
                                       dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    return prepare_pt2e(exported, quantizer)


def _observer_state(prepared: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if k.startswith(_OBSERVER)}


def observe(model: nn.Module, images: Iterable[Tensor], source: str) -> Int8Calibration:
    """The int8 calibration of ``model`` (a PDD model in fp32): each :data:`QUANTIZED` teacher's observers run on
    ``images`` ((B, 3, S, S) ImageNet-normalised normal images, S the model's image size)."""
    size = model.cfg.image_size
    prepared = {name: _prepared(getattr(model.teachers, name), size) for name in QUANTIZED}
    count = 0
    with torch.inference_mode():
        for x in images:
            if x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
                raise ValueError(f"int8 calibration: images must be (B, 3, {size}, {size}), got {tuple(x.shape)}")
            for graph in prepared.values():
                graph(x.float())
            count += x.shape[0]
    if count == 0:
        raise ValueError(f"int8 calibration: no images from {source}")
    return Int8Calibration({name: _observer_state(g) for name, g in prepared.items()}, count, source, _versions())


class Int8Teacher(nn.Module):
    """A quantized teacher: ``graph`` (quantize, int8 convolution, dequantize) run compiled with frozen weights
    (``native``: oneDNN's int8 kernels) or eagerly (emulated in fp32). Returns the teacher's feature list."""

    def __init__(self, graph: torch.fx.GraphModule, native: bool) -> None:
        super().__init__()
        self.graph = graph
        self._compiled = torch.compile(graph, dynamic=False) if native else None

    @property
    def native(self) -> bool:
        return self._compiled is not None

    def train(self, mode: bool = True) -> Int8Teacher:
        # Frozen, and the exported graph is already its inference form. Flags only: torchao's train/eval switch of
        # an exported graph re-exports its patterns strictly, which resets dynamo (every model compiled in this
        # process would recompile on its next call).
        for module in self.modules():
            module.training = False
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        if self._compiled is None:
            return list(self.graph(images))
        if torch.is_grad_enabled():
            raise RuntimeError("the int8 teacher is for inference: run it under torch.inference_mode()")
        # Read when a call compiles (the first of each batch size): weights become constants, prepacked.
        with inductor_config.patch(freezing=True):
            return list(self._compiled(images))


def quantized_teacher(teacher: nn.Module, name: str, calibration: Int8Calibration, image_size: int,
                      native: bool) -> Int8Teacher:
    """``teacher`` (PDDModel.teachers.``name``, fp32) quantized with ``calibration``'s observed state."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    state = calibration.observers.get(name)
    if state is None:
        raise Int8Error(f"the int8 calibration has no observations of the {name} teacher (it has "
                        f"{sorted(calibration.observers)}); run `pdd calibrate --precision int8` again")
    prepared = _prepared(teacher, image_size)
    expected = {k: v.shape for k, v in prepared.state_dict().items() if k.startswith(_OBSERVER)}
    if set(state) != set(expected):
        raise Int8Error(f"the int8 calibration of the {name} teacher was observed on another graph "
                        f"({len(state)} observer buffers, this one has {len(expected)}; made with "
                        f"{calibration.versions or 'unknown versions'}, here {_versions()}): run `pdd calibrate "
                        f"--precision int8` again")
    missing, unexpected = prepared.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(_OBSERVER) for k in missing):
        raise Int8Error(f"the int8 calibration of the {name} teacher does not fit its observers "
                        f"({unexpected or missing})")
    return Int8Teacher(convert_pt2e(prepared), native).eval()
