"""Training: the loop, schedules, caption sampling, checkpoints and the background job."""
