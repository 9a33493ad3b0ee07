"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class QflowError(Exception):
    """A problem with the user's input (file, config, data, model), not a bug in qflow."""


class ConfigError(QflowError, ValueError):
    """An invalid configuration: unknown key, impossible bit width, bad mode name."""


class ArtifactNotRunnableError(QflowError):
    """An exported artifact that this machine cannot run (a CUDA build without a GPU, a
    cross-compiled library); ``qflow verify`` reports the reason as that artifact's row."""
