"""Evaluation metrics for Stage 2: segmentation (dataset-level confusion matrix) and salient
object detection (PySODMetrics' definitions), as torchmetrics `Metric`s so they sync under DDP."""

from pipeline.metrics.segmentation import MIOU_POLICY, SegmentationMetrics
from pipeline.metrics.sod import SODMetrics

__all__ = ["MIOU_POLICY", "SODMetrics", "SegmentationMetrics"]
