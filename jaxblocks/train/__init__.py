"""jaxblocks.train."""
