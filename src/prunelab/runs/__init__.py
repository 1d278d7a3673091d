"""Running experiments: one run (experiment), the store of results, sweeps and their executors."""
