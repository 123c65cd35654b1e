"""Tests of pallas_kernels.queries layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import queries


def test_group_and_ungroup_round_trip():
  q = jax.random.normal(jax.random.key(0), (2, 3, 8, 4))
  grouped = queries.group_heads(q, 2)
  np.testing.assert_array_equal(grouped[:, :, 1, 2], q[:, :, 6])
  per_kv = jnp.transpose(grouped, (0, 2, 3, 1, 4))
  out, lse = queries.ungroup(per_kv, per_kv[..., 0], decode=False,
                             dtype=jnp.float32)
  np.testing.assert_array_equal(out, q)
  np.testing.assert_array_equal(lse, q[..., 0])
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    queries.group_heads(q, 3)


def test_query_weights():
  mask = jnp.array([[True, False, True], [False, False, False]])
  np.testing.assert_allclose(queries.query_weights(mask, 2, 3),
                             [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(queries.query_weights(None, 1, 4), [[0.25] * 4])
  assert queries.is_decode(jnp.zeros((1, 2, 4)))
  assert queries.to_tokens(jnp.zeros((1, 2, 4))).shape == (1, 1, 2, 4)
