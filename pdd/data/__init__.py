"""Data layer: image readers, anomaly-detection datasets and the brain-synth benchmark."""

from pdd.data.datasets import MASK_SUFFIXES, AnomalyDataset, MetaJsonDataset, MVTecStyleDataset, Sample, split_train_val
from pdd.data.readers import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NIFTI_SUFFIXES,
    ImageReadError,
    read_image,
    read_image_bytes,
    read_mask,
    read_volume_slices,
    robust_normalise,
    to_model_input,
)
from pdd.data.synth import (
    CONTRASTS,
    DEFECTS,
    BrainTemplate,
    generate_brain_synth,
    load_brain_template,
    render_brain_slice,
)

__all__ = [
    "CONTRASTS",
    "DEFECTS",
    "DICOM_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "AnomalyDataset",
    "BrainTemplate",
    "ImageReadError",
    "MVTecStyleDataset",
    "MetaJsonDataset",
    "Sample",
    "generate_brain_synth",
    "load_brain_template",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "read_volume_slices",
    "render_brain_slice",
    "robust_normalise",
    "split_train_val",
    "to_model_input",
]
