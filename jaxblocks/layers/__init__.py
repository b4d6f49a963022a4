"""jaxblocks.layers."""
