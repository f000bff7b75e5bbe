"""The run machinery's errors that a command turns into a message and an exit status (main.py), kept apart from
the modules that raise them so that a command can name them without loading Orbax."""


class CheckpointError(RuntimeError):
    """No checkpoint in the run's directory restores (the message lists each step and why)."""


class ResumeError(ValueError):
    """The workdir's checkpoint was written with a config that is incompatible with this one."""
