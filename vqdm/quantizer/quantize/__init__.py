"""`vqdm quantize`: calibration statistics along sampling trajectories, then AQ of every selected
layer, 7 subsets in order, resumable (config, run, checks, checkpoint, cli)."""
