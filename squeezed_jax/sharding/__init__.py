"""Running squeezed-jax on several devices with JAX's SPMD machinery (Mesh, NamedSharding,
shard_map): a mesh of (data, heads, context) axes, logical sharding rules, the context-parallel
layout and attention, and sharded fixed-context checkpoints. See docs/sharding.md.
"""

from squeezed_jax.sharding.context_layout import ContextShards, context_parallel_layers
from squeezed_jax.sharding.context_parallel import (ShardedOnlineAttention, merge_across,
                                                    lse_all_reduce, sharded_context_attention)
from squeezed_jax.sharding.mesh import AXES, CONTEXT, DATA, HEADS, MeshConfig, make_mesh
from squeezed_jax.sharding.rules import (logical_sharding, logical_spec, shard_caches,
                                         shard_fixed_context, shard_model)
