"""Training and evaluation on top of the model: the trainer, its schedules, logs and run folders, and the evaluator."""
