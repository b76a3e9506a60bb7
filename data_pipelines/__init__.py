"""Data for unimedvl_jax: record schema, shard builders, embedded real medical data, transforms, packing and the
Grain input pipeline."""
