"""Evaluation of pre-trained encoders: kNN monitor, linear probe, fine-tuning (`python -m scale.eval`)."""
from .knn import KnnMonitor, knn_accuracy, knn_scores

__all__ = ["KnnMonitor", "knn_accuracy", "knn_scores"]
