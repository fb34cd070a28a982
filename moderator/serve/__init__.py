"""``moderator serve``: decide before publishing. A synchronous HTTP endpoint with the stream's policies,
model, micro-batcher and trail.

Modules: ``endpoint.py`` (:class:`~moderator.serve.endpoint.Endpoint`: the web server on a thread, the
decider, the stages it feeds), ``app.py`` (the routes, keys, limits, errors), ``decide.py`` (a request's
images through the pipeline, published), ``admission.py`` (the bounded admission queue), ``limits.py``
(per-key rates), ``keys.py`` (the API keys file), ``store.py`` (idempotency), ``openai_api.py`` (OpenAI's
moderation shape), ``openapi.py`` (``/openapi.json``), ``errors.py`` (reason codes to statuses).

Beside a stream worker (``moderator run`` with ``MODERATOR_SERVE_IN_WORKER``), the endpoint's requests join
the worker's image stage and micro-batcher and use its producer; alone (``moderator serve``), it has stages
of its own (:class:`~moderator.serve.endpoint.Pipeline`). The composition root (``moderator/app.py``) builds
it.
"""
