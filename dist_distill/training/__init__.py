"""Running a training job: the trainer life cycle (trainer), the DeepSpeed config (deepspeed_config),
committed checkpoints (checkpoint), process-group set-up (distributed) and the fault-injection seam (faults)."""
