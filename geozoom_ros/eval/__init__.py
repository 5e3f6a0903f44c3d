"""Evaluation: metrics, dataset and bag evaluation, reports."""
