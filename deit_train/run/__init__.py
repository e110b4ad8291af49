"""What wraps a training run: config and preflight checks, resume, checkpoint writes, loggers, console,
environment (Slurm, accelerators), plots and the callbacks that record a run."""
