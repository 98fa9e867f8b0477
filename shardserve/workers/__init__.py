"""Rank workers: load a model shard, own its KV cache, execute `StepPlan`s.

In: a `StepPlan` per step (from the leader). Out: a `StepResult` (tokens sampled on the last stage).
"""
