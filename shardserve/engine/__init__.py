"""The leader's engine: requests in, tokens out.

`scheduler.schedule()` → `StepPlan` → `executor.run(plan)` → `StepResult` → `scheduler.update`.
The scheduler and the KV-cache manager are plain Python; the sampler runs on the last rank.
"""
