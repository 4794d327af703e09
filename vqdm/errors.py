"""Exceptions that library code raises; only the CLI turns them into one-line messages."""


class VQDMError(Exception):
    """Base class for errors a user can act on."""


class ArtifactError(VQDMError):
    """An artifact folder is missing, corrupt, or does not match its manifest or config."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelFolderError(VQDMError):
    """A folder given as a diffusers model is not one vqdm can read."""


class ConfigError(VQDMError):
    """An unsupported quantization or run configuration."""
