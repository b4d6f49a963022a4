"""Synthetic sequence tasks generated on the fly (no downloads): copying and associative recall.

Each generator returns a dict of ``inputs [B, T]`` (int32 tokens), ``targets [B, T]`` (the next
token to predict at every position) and ``mask [B, T]`` (float32, 1 where the target counts), so
a causal LM is trained with ``sum(mask · CE(logits, targets)) / sum(mask)``. Chance level is
``log(number of possible answers)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def copy_task(key: jax.Array, batch: int, length: int, vocab: int) -> dict[str, jax.Array]:
    """``x_1 .. x_L SEP x_1 .. x_L``: after the separator the model must copy the first half.

    Tokens ``x`` are in ``[0, vocab)``, the separator is ``vocab``; so the LM vocabulary is
    ``vocab + 1``. Targets count on the copied half only (chance: ``log(vocab)``).
    """
    x = jax.random.randint(key, (batch, length), 0, vocab, jnp.int32)
    sep = jnp.full((batch, 1), vocab, jnp.int32)
    seq = jnp.concatenate([x, sep, x], axis=1)  # [B, 2L + 1]
    inputs, targets = seq[:, :-1], seq[:, 1:]
    mask = (jnp.arange(2 * length)[None, :] >= length).astype(jnp.float32)  # predict the copy
    return {"inputs": inputs, "targets": targets, "mask": jnp.broadcast_to(mask, inputs.shape)}


def associative_recall(
    key: jax.Array, batch: int, num_pairs: int, num_keys: int, num_values: int, num_queries: int
) -> dict[str, jax.Array]:
    """Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology").

    ``k_1 v_1 .. k_n v_n q_1 a_1 .. q_m a_m``: distinct keys (ids ``[0, num_keys)``) bound to
    values (ids ``num_keys + [0, num_values)``), then queries drawn from the bound keys, each
    followed by its value. The target counts where the next token is an answer ``a_j``
    (chance: ``log(num_values)``). The LM vocabulary is ``num_keys + num_values``.
    """
    if num_pairs > num_keys:
        raise ValueError(f"associative_recall: num_pairs {num_pairs} > num_keys {num_keys}")
    kk, kv, kq = jax.random.split(key, 3)
    keys = jax.vmap(lambda k: jax.random.permutation(k, num_keys)[:num_pairs])(
        jax.random.split(kk, batch)
    )  # [B, n] distinct per row
    values = num_keys + jax.random.randint(kv, (batch, num_pairs), 0, num_values, jnp.int32)
    which = jax.random.randint(kq, (batch, num_queries), 0, num_pairs)
    q = jnp.take_along_axis(keys, which, axis=1)
    a = jnp.take_along_axis(values, which, axis=1)
    ctx = jnp.stack([keys, values], axis=-1).reshape(batch, 2 * num_pairs)
    qa = jnp.stack([q, a], axis=-1).reshape(batch, 2 * num_queries)
    seq = jnp.concatenate([ctx, qa], axis=1).astype(jnp.int32)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    pos = jnp.arange(inputs.shape[1])
    is_answer = (pos >= 2 * num_pairs) & ((pos - 2 * num_pairs) % 2 == 0)  # input is a query
    mask = jnp.broadcast_to(is_answer.astype(jnp.float32), inputs.shape)
    return {"inputs": inputs, "targets": targets, "mask": mask}
