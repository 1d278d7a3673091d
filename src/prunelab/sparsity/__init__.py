"""Masks, scores, allocation and schedules: the parts every pruning method shares."""
