"""What the loss is: the ZeRO-3 distillation module (module), intermediate-layer terms (intermediate),
term-weight / temperature schedules and progressive stages (schedules). The divergences are in dist_distill.losses."""
