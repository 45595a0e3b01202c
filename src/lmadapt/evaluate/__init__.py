"""Evaluation: metrics (scikit-learn / scipy / seqeval), markdown reports, PNG plots."""
