"""Generate a Triton Inference Server model repository that serves PDD.

Layout (every ``config.pbtxt`` is parsed into Triton's ``ModelConfig`` protobuf and the ensemble's wiring
is checked before the repository is moved into place)::

    <out>/pdd/config.pbtxt           ensemble: preprocess -> pdd_engine -> postprocess
    <out>/preprocess/1/model.py      Python backend: uint8 (B, H, W, C) pixels or image / DICOM file bytes
                                     -> resized, ImageNet-normalised (B, 3, S, S)
    <out>/preprocess/1/readers/      pdd/data/readers.py and the modules it imports (readers.BUNDLE), which
                                     decode the files as `pdd predict` does, under the same decode budget
    <out>/pdd_engine/1/...           the network, one of three flavours:
                                       "tensorrt"    model.plan + engine.json   (TensorRT backend, GPU)
                                       "onnxruntime" model.onnx + model.json    (ONNX Runtime backend,
                                                                                  portable form)
                                       "python"      model.py + model.onnx      (ONNX Runtime inside the
                                                                                  Python backend)
    <out>/pdd_engine/1/kernels/      python flavour, plugin form: the torch-free ONNX Runtime ops and the C
                                     source of the CPU scan kernel (kernels.ort_ops.BUNDLE), which the
                                     server compiles when the model loads
    <out>/postprocess/1/model.py     Python backend: calibration -> normalised_score (B, 1), pred_label (B, 1),
                                     pred_mask (B, S, S); pdd_calibration.py beside it is pdd/calibration.py

Clients call ``pdd`` with ``images`` (UINT8, (B, H, W, 1|3)) or ``images_encoded`` (BYTES, (B, 1); with
DICOM files optionally ``dicom_window``, FP32 (B, 2) = centre, width) and get ``pred_score`` (FP32
(B, 1)), ``anomaly_map`` (FP32 (B, S, S)), ``normalised_score`` (FP32 (B, 1)), ``pred_label`` (BOOL
(B, 1)) and ``pred_mask`` (BOOL (B, S, S)). Images larger than :data:`MAX_SIDE` pixels on a side are
refused.

The python flavour serves the ``plugin`` ONNX form by default (``onnx_form``): the graph TensorRT gets,
whose ``pdd::SS2DScan`` nodes run the compiled CPU scan kernel and whose ``pdd::AnomalyHead`` node runs the
numpy head, ~1.4x faster on CPU than the ``portable`` form (standard ONNX ops only). The server then needs
a C compiler (``cc``/``gcc``, or ``$CC``): the engine model compiles the kernel for the server's CPU when it
loads, and fails to load, naming the missing compiler, without one; ``onnx_form="portable"`` needs none.
The ``onnxruntime`` flavour serves the portable form only. The form is recorded in the engine config's
``onnx_form`` parameter.

The decisions come from the export metadata's calibration (:mod:`pdd.calibration`), written into the
postprocess config; ``threshold`` / ``pixel_threshold`` override its raw thresholds, and so can each
request. :func:`store_calibration` replaces the calibration of a built repository (or of an ONNX /
engine export) without re-exporting. Without a calibration nothing is flagged.

Example::

    >>> from pdd.checkpoint import load_model
    >>> from export.triton_repo import build_triton_repo
    >>> build_triton_repo("triton_repo", flavour="python", model=load_model("best.pt"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pdd.calibration
from export.metadata import store_metadata_calibration
from export.onnx_export import FORMS, export_onnx
from export.triton_config import (
    DEFAULT_ONNX_FORM,
    DEFAULT_QUEUE_DELAY_US,
    ENGINE,
    ENSEMBLE,
    FLAVOURS,
    INSTANCE_KINDS,
    KERNELS_FOLDER,
    MAX_SIDE,
    MODEL_NAMES,
    POSTPROCESS,
    PREPROCESS,
    READERS_FOLDER,
    EngineArtifact,
    RepositoryError,
    artifact_from_engine,
    artifact_from_onnx,
    check_repository,
    config_text,
    engine_config,
    ensemble_config,
    parse_config,
    postprocess_config,
    postprocess_note,
    preprocess_config,
    repository_flavour,
    write_config,
)
from kernels import ort_ops
from pdd.calibration import Calibration
from pdd.config import atomic_write_text
from pdd.data import readers
from pdd.data.readers import DecodeBudget

_TEMPLATES = Path(__file__).resolve().parent / "triton_models"
# The calibration maths (numpy only), copied beside the postprocess model: one implementation for both sides.
_CALIBRATION_SOURCE = Path(pdd.calibration.__file__)
_CALIBRATION_COPY = "pdd_calibration.py"
# The image readers (pdd.data.readers.BUNDLE), copied into READERS_FOLDER beside the preprocess model.
_READERS_SOURCE = Path(readers.__file__).resolve().parent
# The torch-free kernels package (ONNX Runtime ops, CPU scan kernel source), copied beside a plugin-form
# python engine.
_KERNELS_SOURCE = Path(ort_ops.__file__).resolve().parent

__all__ = [
    "ENGINE",
    "ENSEMBLE",
    "FLAVOURS",
    "MAX_SIDE",
    "MODEL_NAMES",
    "POSTPROCESS",
    "PREPROCESS",
    "EngineArtifact",
    "RepositoryError",
    "build_triton_repo",
    "check_repository",
    "parse_config",
    "repository_flavour",
    "store_calibration",
]

def store_calibration(path: str | os.PathLike, calibration: Calibration) -> Path:
    """Put ``calibration`` into an export without re-exporting it; returns what was written.

    ``path``: a Triton model repository (the postprocess config's ``calibration`` parameter and the
    engine's metadata file; threshold overrides there are kept), an ONNX file or its ``model.json``, or a
    TensorRT engine folder. A running server picks it up when the postprocess model is reloaded.
    """
    path = Path(path)
    config_path = path / POSTPROCESS / "config.pbtxt"
    if not config_path.is_file():
        return store_metadata_calibration(path, calibration)
    cfg = parse_config(config_path)
    if "calibration" not in cfg.parameters:
        raise RepositoryError(f"{config_path} predates calibration records; regenerate the repository with "
                              "`pdd export triton-repo`")
    version = path / ENGINE / "1"
    for meta in (version / "model.json", version / "engine.json"):
        if meta.is_file():
            store_metadata_calibration(meta, calibration)
    cfg.parameters["calibration"].string_value = json.dumps(calibration.to_dict(), separators=(",", ":"))
    thresholds = [cfg.parameters[k].string_value or None for k in ("image_threshold", "pixel_threshold")]
    note = postprocess_note(calibration, *(None if t is None else float(t) for t in thresholds))
    atomic_write_text(config_path, config_text(cfg, note))
    return config_path


# --- the builder ----------------------------------------------------------------------------------------


def _place(src: Path, dst: Path, move: bool) -> None:
    """Move a staged file, else hard-link (same file system) or copy: weights are hundreds of MiB."""
    if move:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_choices(flavour: str, model: object | None, engine_dir: object | None, max_batch_size: int,
                   instance_count: int, instance_kind: str | None, onnx_form: str | None) -> None:
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    if onnx_form is not None and (onnx_form not in FORMS or flavour == "tensorrt"):
        raise RepositoryError(f"onnx_form must be one of {FORMS} for the python and onnxruntime flavours (the "
                              f"tensorrt flavour serves an engine), got {onnx_form!r} for {flavour!r}")
    if flavour == "onnxruntime" and onnx_form == "plugin":
        raise RepositoryError("Triton's ONNX Runtime backend cannot run the plugin form's custom ops: serve it with "
                              "the python flavour, or the portable form with this one")
    if (model is None) == (engine_dir is None):
        raise RepositoryError("give exactly one of model (a PDD model to export) and engine_dir (an export folder)")
    if flavour == "tensorrt" and engine_dir is None:
        raise RepositoryError("the tensorrt flavour serves a prebuilt engine: pass engine_dir, a folder made by "
                              "export/build_trt.py")
    if max_batch_size < 1:
        raise RepositoryError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if instance_count < 1 or (instance_kind is not None and instance_kind not in INSTANCE_KINDS):
        raise RepositoryError(f"instance_count must be >= 1 and instance_kind one of {sorted(INSTANCE_KINDS)} or "
                              f"None, got {instance_count}, {instance_kind!r}")


def _write_models(repo: Path, art: EngineArtifact, flavour: str, max_batch_size: int, threshold: float | None,
                  pixel_threshold: float | None, instance_count: int, instance_kind: str | None,
                  queue_delay_us: int, budget: DecodeBudget) -> None:
    """The four model folders under ``repo``: configs, Python models and the files they carry (no weights)."""
    note = postprocess_note(art.calibration, threshold, pixel_threshold)
    write_config(repo / ENSEMBLE, ensemble_config(art, max_batch_size),
                 "PDD ensemble: preprocess -> pdd_engine -> postprocess.")
    (repo / ENSEMBLE / "1").mkdir()
    # Keeps the (empty) version folder in version control.
    (repo / ENSEMBLE / "1" / ".gitkeep").touch()
    write_config(repo / PREPROCESS, preprocess_config(art, max_batch_size, budget),
                 f"uint8 pixels, or image / DICOM file bytes -> {art.image_size}² normalised; sides over "
                 f"{MAX_SIDE} refused, files over the decode budget (max_*) refused.")
    write_config(repo / ENGINE, engine_config(art, flavour, max_batch_size, instance_count, instance_kind,
                                              queue_delay_us),
                 f"PDD network, {flavour} flavour: {art.description}.")
    write_config(repo / POSTPROCESS, postprocess_config(art, max_batch_size, threshold, pixel_threshold), note)
    for name, template in ((PREPROCESS, "preprocess.py"), (POSTPROCESS, "postprocess.py")):
        (repo / name / "1").mkdir()
        shutil.copy2(_TEMPLATES / template, repo / name / "1" / "model.py")
    # The repository is deployed without this project: it carries the image reader and the calibration
    # maths with it, one implementation each for local and served results.
    (repo / PREPROCESS / "1" / READERS_FOLDER).mkdir()
    for name in readers.BUNDLE:
        shutil.copy2(_READERS_SOURCE / name, repo / PREPROCESS / "1" / READERS_FOLDER / name)
    shutil.copy2(_CALIBRATION_SOURCE, repo / POSTPROCESS / "1" / _CALIBRATION_COPY)
    version = repo / ENGINE / "1"
    version.mkdir()
    if flavour == "python":
        shutil.copy2(_TEMPLATES / "ort_engine.py", version / "model.py")
        if art.onnx_form == "plugin":
            for name in ort_ops.BUNDLE:
                (version / KERNELS_FOLDER / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(_KERNELS_SOURCE / name, version / KERNELS_FOLDER / name)


def _check_form(art: EngineArtifact, flavour: str, onnx_form: str | None, where: Path) -> None:
    """The ONNX form given (``art``) is the one asked for and one the flavour can serve."""
    if onnx_form is not None and art.onnx_form != onnx_form:
        raise RepositoryError(f"{where} is the {art.onnx_form} ONNX form, not the {onnx_form} form asked for: "
                              f"export that form (`pdd export onnx --form {onnx_form}`) or leave onnx_form out")
    if flavour == "onnxruntime" and art.onnx_form != "portable":
        raise RepositoryError(f"{where} is the {art.onnx_form} form ({art.description}), whose custom ops "
                              "Triton's ONNX Runtime backend cannot run: export the portable form (`--form "
                              "portable`), or serve the plugin form with the python flavour")


def build_triton_repo(out: str | os.PathLike, flavour: str = "python", model: object | None = None,
                      engine_dir: str | os.PathLike | None = None, max_batch_size: int = 8,
                      image_size: int | None = None, *, threshold: float | None = None,
                      pixel_threshold: float | None = None, instance_count: int = 1,
                      instance_kind: str | None = None, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      onnx_form: str | None = None, decode_budget: DecodeBudget | None = None) -> Path:
    """Write the PDD model repository to ``out`` and return its path.

    The network comes from ``model`` (a :class:`pdd.model.PDDModel`, exported here to ONNX at
    ``image_size``, default its config's, in the form ``onnx_form``: default ``"plugin"`` for the python
    flavour, ``"portable"`` for onnxruntime) or from ``engine_dir``: a TensorRT engine folder
    (``engine.plan`` + ``engine.json``) for ``flavour="tensorrt"``, else a folder holding ``model.onnx`` +
    ``model.json`` (or the ``.onnx`` path itself), served in the form it was exported in (``onnx_form``, if
    given, must name it). The metadata's calibration drives the postprocess model;
    ``threshold`` / ``pixel_threshold`` (raw) replace its image / pixel threshold.
    ``instance_kind``: "cpu", "gpu" or "auto" for the engine (default: gpu for TensorRT, auto for ONNX
    Runtime, cpu for the Python flavour), with ``instance_count`` instances. ``decode_budget``: what the
    preprocess model lets a file sent as bytes claim (:class:`pdd.data.readers.DecodeBudget`; its defaults
    when None), written into its config.

    The four model folders in ``out`` are replaced; other files there (a README) are kept.
    """
    _check_choices(flavour, model, engine_dir, max_batch_size, instance_count, instance_kind, onnx_form)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        if model is not None:
            report = export_onnx(model, staging / "export", form=onnx_form or DEFAULT_ONNX_FORM[flavour],
                                 batch=(1, max_batch_size), image_size=image_size)
            art = artifact_from_onnx(report.path)
        else:
            src = Path(engine_dir)
            art = artifact_from_engine(src) if flavour == "tensorrt" else artifact_from_onnx(src)
            if image_size is not None and image_size != art.image_size:
                raise RepositoryError(f"{src} was exported at {art.image_size}², not the {image_size}² asked for")
        if flavour != "tensorrt":
            _check_form(art, flavour, onnx_form, art.files["model.onnx"])
        if art.max_batch is not None and art.max_batch < max_batch_size:
            raise RepositoryError(f"the engine accepts batches up to {art.max_batch}; max_batch_size "
                                  f"{max_batch_size} needs a re-export with a larger batch range")
        if art.min_batch > 1:
            raise RepositoryError(f"the engine's profile starts at batch {art.min_batch}: the server sends single "
                                  f"requests as batch 1 and warms up with it; rebuild with --batch 1:OPT:MAX")
        repo = staging / "repo"
        _write_models(repo, art, flavour, max_batch_size, threshold, pixel_threshold, instance_count, instance_kind,
                      queue_delay_us, decode_budget or DecodeBudget())
        for name, src_file in art.files.items():
            _place(src_file, repo / ENGINE / "1" / name, move=model is not None)
        check_repository(repo)
        for name in MODEL_NAMES:
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(repo / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
