"""Evaluation: refusal judges, losses (KL, cross-entropy) and statistics."""
