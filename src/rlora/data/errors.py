class DataError(ValueError):
    """Bad task data: the message names the file, the line and the field, and what was expected."""
