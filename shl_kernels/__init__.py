"""shl-kernels: the Segmented Harmonic Loss (see SPEC.md)."""
from .loss import SegmentedHarmonicLoss, available_backends, segmented_harmonic_loss
from .reference import harmonic_weights, segment_probs
from .segmentation import Segmentation, segment_labels

__all__ = ["Segmentation", "SegmentedHarmonicLoss", "available_backends", "harmonic_weights",
           "segment_labels", "segment_probs", "segmented_harmonic_loss"]
__version__ = "0.0.1"
