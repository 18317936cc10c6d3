"""Beam jobs over images: the caption job (`python beam_runner.py caption`) and dataset inspection."""
