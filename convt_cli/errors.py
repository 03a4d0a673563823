"""The one domain error of convt."""


class ConvtError(ValueError):
    """A user mistake: a bad argument, shape, dtype or file. The CLI prints it as one `Error:` line."""
