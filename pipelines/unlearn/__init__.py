"""The unlearn stage on Ray Train: datasets.py (what Ray Data delivers), worker.py (the Ray Train
worker function), driver.py (checks, the TorchTrainer, the output model); `retrack unlearn` is
pipelines/cli/unlearn.py. The Ray-free logic (plan, checkpoints, run storage, precision) is in retrack/training/."""
