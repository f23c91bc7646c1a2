"""Online PMA on the optimizer: settings, the engine, fused kernels and sharded backends (torch, no transformers)."""
