"""shl-kernels: the Segmented Harmonic Loss (see SPEC.md)."""
from .baselines import (
    asymmetric_loss,
    bce_loss,
    class_balanced_loss,
    class_balanced_weights,
    distribution_balanced_loss,
    focal_loss,
)
from .loss import SegmentedHarmonicLoss, available_backends, segmented_harmonic_loss
from .noise import NoiseReport, find_noisy_labels
from .reference import harmonic_weights, segment_probs
from .segmentation import Segmentation, segment_labels

__all__ = ["NoiseReport", "Segmentation", "SegmentedHarmonicLoss", "asymmetric_loss",
           "available_backends", "bce_loss", "class_balanced_loss", "class_balanced_weights",
           "distribution_balanced_loss", "find_noisy_labels", "focal_loss", "harmonic_weights",
           "segment_labels", "segment_probs", "segmented_harmonic_loss"]
__version__ = "0.0.1"
