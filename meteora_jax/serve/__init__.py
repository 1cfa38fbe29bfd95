"""``meteora-jax serve``: an OpenAI-compatible HTTP server (completions, chat completions, streaming) that
batches concurrent requests. ``requests`` parses bodies, ``batcher`` runs the model on one thread, ``server``
speaks HTTP, ``cli`` is the command."""

from meteora_jax.serve.server import App, make_server

__all__ = ["App", "make_server"]
