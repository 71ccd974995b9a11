"""THFM Serve: an inference engine for THFM (unified video model for human perception)."""

__version__ = "0.1.0"
