"""The one exception type for conversion problems: bad input files, tensors, layouts or outputs."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file and/or tensor at fault."""
