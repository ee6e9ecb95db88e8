"""The one exception type for bad configuration; its message names the key path."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message starts with the key path."""
