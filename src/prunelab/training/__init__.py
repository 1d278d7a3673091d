"""The training engine: loop, optimizers and schedules, compute accounting."""
