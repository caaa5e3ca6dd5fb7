"""What every stage's run shares: the device mesh and multi-host coordination (`sharding`),
Orbax checkpoints (`checkpoint`) and the train state (`train_state`)."""
