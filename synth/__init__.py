"""Beam jobs that synthesize CIR triplets from a caption dataset (`python beam_runner.py synth`)."""
