"""dist_distill: distill a large teacher LLM into a student LLM under DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
