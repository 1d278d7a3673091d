"""prunelab inside the user's own stack: trainer callbacks (Lightning, Hugging Face) and experiment trackers.

Each integration imports its framework only when used, so prunelab itself does not need them
(optional extras ``prunelab[lightning]``, ``prunelab[huggingface]``, ``prunelab[trackers]``).
"""
