"""Parallelism: the device mesh and sharding rules, multi-process start-up."""
