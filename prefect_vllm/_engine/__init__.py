"""The only place that imports vLLM: the engine actor and the pool of them.

`VllmEngineActor` hosts one `AsyncLLM` inside a Ray actor and crash-exits when its
engine dies, so Ray restarts it with a fresh engine. `VllmActorPool` (the flow's) creates
the actors, waits for them to start, counts restarts and names the causes of engine
deaths; `EngineClient` (the shard tasks') sends `GenerateCall`s and fails over.

Nothing is imported here, so that a light module of this package (`markers`) stays light.
"""
