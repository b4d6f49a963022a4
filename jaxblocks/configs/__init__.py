"""jaxblocks.configs."""
