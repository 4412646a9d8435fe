"""The exceptions glimpse raises. Their messages are the CLI's messages for the same errors."""


class GlimpseError(RuntimeError):
    """Any failure of glimpse (a model that does not load, a GPU error, ...)."""


class InvalidInputError(GlimpseError, ValueError):
    """A bad argument: an option out of range, a text too long, an input of the wrong type."""


class ImageError(InvalidInputError):
    """An image that cannot be used: corrupt or unsupported bytes, a wrong array shape or dtype."""


class MissingFileError(GlimpseError, FileNotFoundError):
    """A file or folder that does not exist (an image path, a model folder)."""


class UnsupportedError(GlimpseError):
    """Something this model or glimpse does not do (e.g. caption() on an embedding model)."""
