"""`kdpipe demo`: the whole pipeline offline at toy size, on an embedded corpus.

Above `pipeline/` in the layering (cli → demo → pipeline, student_train, teacher_cache →
schemas): it builds a corpus (`corpus.py`), trains its own tokenizer and teacher
(`teacher.py`, with the student trainer's optimizer, schedule and ignore index), then runs
prepare-data, cache-teacher, train-student and report as a user would (`run.py`).
"""
