"""Train and rollout backends behind the engine's protocols (base.py and engine/rollout.py).

factory.py picks them by name; fsdp2.py, megatron/ (Megatron-core) and sglang/ (SGLang
servers) implement them.
"""
