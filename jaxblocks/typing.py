"""jaxtyping aliases and the dimension legend used across jaxblocks.

Dimension names in shape strings:
  B batch, T time / sequence length, H heads (or channels for long convolutions),
  K key head dim, V value head dim, C channels, G gates / groups, N heads (RNN) or
  state size (SSM), D head dim (RNN), L length, S number of recurrent states.
"""

from jaxtyping import Array, Float, Int, PRNGKeyArray

__all__ = ["Array", "Float", "Int", "PRNGKeyArray"]
