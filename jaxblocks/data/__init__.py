"""jaxblocks.data."""
