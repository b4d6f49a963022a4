"""jaxblocks.blocks."""
