"""User-facing errors.

Every error a user can cause (a bad video, an unknown task, a checkpoint missing a part, a shape
outside an export profile) is raised as a ThfmError subclass with a message that names the problem.
The CLI prints the message and exits non-zero without a traceback; the Triton models put it into
the response as a TritonError so the server keeps serving.
"""


class ThfmError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class VideoError(ThfmError):
    """The input could not be decoded as a video, or decodes to something unusable."""


class CheckpointError(ThfmError):
    """The checkpoint directory is missing a part or does not match what the code expects."""


class TaskError(ThfmError):
    """An unknown task, or a task the checkpoint does not provide."""


class ShapeError(ThfmError):
    """A shape outside what the model or an export profile accepts."""


class ExportError(ThfmError):
    """Export or validation failed (the message carries the numbers that failed)."""


class ServerError(ThfmError):
    """tritonserver could not be started, or a request to it failed."""
