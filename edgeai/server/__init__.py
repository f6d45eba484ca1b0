"""`edgeai serve`: an OpenAI-compatible server for local apps, on a Unix socket.

| module            | its one job                                                          |
|-------------------|----------------------------------------------------------------------|
| transport.py      | the socket (0600, private dir, stale/live checks), TCP guard, signals |
| app.py            | routes, body parsing, OpenAI-style errors                            |
| schemas.py        | pydantic request/response models (sampling bounds from options.py)    |
| openai_adapter.py | OpenAI request → native request; Events/Answer → bodies and SSE      |
| escalation.py     | the bridge to edgeai.routing.respond (route, gate, escalate) and embeddings  |
| scheduler.py      | the one owner of MLX: queue, continuous batching, cancel, keep-alive |
| decode.py         | per-sequence sampler and token → Event step                          |
| models.py         | which model names are served, and where they are                     |
| metrics.py        | Prometheus metrics                                                   |
| openapi.py        | the OpenAPI document                                                 |
"""
