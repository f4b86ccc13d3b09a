"""Sequence-level KD: the teacher writes responses for a prompt set (`dd-generate`, dist_distill/generate.py)."""
