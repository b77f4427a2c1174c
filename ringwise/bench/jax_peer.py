"""Times the paper authors' JAX package (ringattention 0.1.2) on simulated CPU devices.

Run as a script in its own process (the device count must be set before JAX starts):
    XLA_FLAGS=--xla_force_host_platform_device_count=W python -m ringwise.bench.jax_peer W SEQ HEADS DIM CAUSAL REPEATS
prints one JSON line {"seconds": median forward+backward time}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from functools import partial


def main(world, seq, heads, dim, causal, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.shard_map import shard_map
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from ringattention import ringattention_jax

    mesh = Mesh(np.array(jax.devices()[:world]), ("sp",))
    chunk = min(512, seq // world)
    kwargs = dict(
        causal_block_size=1 if causal else None,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        query_chunk_size=chunk,
        key_chunk_size=chunk,
        dtype=jnp.float32,
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=None,
        prevent_cse=True,
    )
    spec = P(None, "sp", None, None)
    attn = shard_map(
        partial(ringattention_jax, axis_name="sp", float32_logits=True, cache_idx=None, blockwise_kwargs=kwargs),
        mesh=mesh,
        in_specs=(spec, spec, spec, None, None),
        out_specs=spec,
        check_rep=False,
    )

    def loss(q, k, v, dout):
        return jnp.sum(attn(q, k, v, None, None) * dout)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shard = NamedSharding(mesh, spec)
    q, k, v, dout = (jax.device_put(jax.random.normal(kk, (1, seq, heads, dim), jnp.float32), shard) for kk in keys)
    jax.block_until_ready(step(q, k, v, dout))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, k, v, dout))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    w, s, h, d, c, r = sys.argv[1:7]
    print(json.dumps({"seconds": main(int(w), int(s), int(h), int(d), c == "1", int(r))}))
