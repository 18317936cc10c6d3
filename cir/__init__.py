"""Shared code of the toolkit: the CLIP backbone factory and helpers used by pipeline, synth, train and eval."""
