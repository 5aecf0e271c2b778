"""Stage composition: corpus ingestion into the token store, run orchestration, Slurm jobs."""
