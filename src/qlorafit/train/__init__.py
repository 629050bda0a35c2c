"""Training: schedules, the chunked loss, checkpoints and the loop."""
