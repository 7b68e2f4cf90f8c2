"""A training run around the step: the loop (`loop`, and `sft` for supervised fine-tuning),
the optimizer, several processes (`parallel`), checkpoints and model cards, the monitor, step
hooks, trackers and the run report."""
