"""Process launch, data-parallel reduction hooks, parameter sharding and sharded checkpoints."""
