"""PDD: Manifold-Prior Diverse Distillation for medical-image anomaly detection.

    >>> from pdd import PDDConfig, build_pdd
    >>> model = build_pdd(PDDConfig(image_size=256))  # random teachers when no weights are given
"""

from pdd.config import PDDConfig
from pdd.model import PDDFeatures, PDDModel, PDDOutput, build_pdd

__all__ = ["PDDConfig", "PDDFeatures", "PDDModel", "PDDOutput", "build_pdd"]
__version__ = "0.1.0"
