"""`vqdm distill`: teacher-student fine-tuning of a VQ artifact's codebooks, scales and dense
parameters, codes frozen, resumable (config, run, checks, checkpoint, cli)."""
