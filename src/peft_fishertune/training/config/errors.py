"""The one error of a bad experiment config. A leaf module: the method table and the trainers raise it without
importing the config machinery (which imports them)."""


class ConfigError(ValueError):
    """A bad experiment configuration (names the key and what was expected)."""
