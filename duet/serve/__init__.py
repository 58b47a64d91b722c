"""`duet serve`: an OpenAI-compatible HTTP server on duet's engine, with the solver-critic dialogue as a model.

* :mod:`duet.serve.service`: the engine behind the endpoints (admission into a bounded queue, generation in
  threads bridged to asyncio, cancellation, log-probabilities, the dialogue as a model);
* :mod:`duet.serve.metrics`: counters and the Prometheus text of ``GET /metrics``;
* :mod:`duet.serve.request_shapes`: the request bodies, their validation and OpenAI-shaped errors;
* :mod:`duet.serve.response_shapes`: OpenAI's response envelopes and log-probabilities, the dialogue's reply;
* :mod:`duet.serve.app`: the FastAPI app (the routes, SSE streaming, auth, limits);
* :mod:`duet.serve.cli`: the ``duet serve`` command (settings, safe binding, uvicorn with a graceful drain).

It sits at the layer of the UI: it builds on app (settings, backends), agents (the dialogue) and engine.
"""
