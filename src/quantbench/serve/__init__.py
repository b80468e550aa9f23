"""Run a model: batched streamed generation (``generate.py``) and the OpenAI-compatible server (``server.py``)."""
