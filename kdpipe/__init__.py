"""kdpipe: offline distillation for language models.

Run the teacher once (`kdpipe cache-teacher`), store importance-sampled sparse logits and
FFN activation snapshots, then train any number of Low-Rank-Clone students from that cache
(`kdpipe train-student`).
"""

__version__ = "0.1.0"
