"""Evaluation: the SHREC localization/classification protocol and segmentation metrics."""
