"""Launchers beyond local processes and torchrun: Ray Train and Ray job submission."""
