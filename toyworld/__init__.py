"""The procedural toy world: scenes, edits, rendering, and held-out benchmarks in official layouts.

It is the offline demo and test bed. Pipeline, synthesis, training and eval code never special-case it;
the one labelled exception is the synthesis job's exact toy editor, which uses `toyworld.edits`.
"""
