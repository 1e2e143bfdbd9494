"""`hetero serve`: the OpenAI chat-completions protocol over one loaded model.

`requests` turns request bodies into validated jobs (or an `ApiError`), `worker` runs them one
at a time on the model with a prompt cache, `app` is the ASGI application (Starlette, served by
uvicorn) that ties the two to HTTP: routes, API key, body limits, streaming, metrics.
"""
