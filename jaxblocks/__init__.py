"""jaxblocks: efficient building blocks of recent papers for JAX/Flax.

Public API re-exports only; see README.md for the map of what exists.
"""

from jaxblocks.registry import create_model as create_model
from jaxblocks.registry import list_models as list_models
from jaxblocks.registry import register_model as register_model

__version__ = "0.1.0"
