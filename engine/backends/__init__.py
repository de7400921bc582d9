"""Train and rollout backends behind the engine's protocols (see base.py and engine/rollout.py)."""
