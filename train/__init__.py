"""Accelerate trainers: stage 0 (CLIP contrastive), stage I (mapping), stage II (composing)."""
