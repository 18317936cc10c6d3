"""Evaluation: official-protocol scoring, model evaluation and ablation studies (`python -m eval`)."""
