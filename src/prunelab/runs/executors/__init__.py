"""Where the runs of a sweep execute: local worker processes or a Ray cluster."""
