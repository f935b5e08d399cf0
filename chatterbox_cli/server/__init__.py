"""`chatterbox serve`: an OpenAI-compatible speech server on the model-loading service (extra: server)."""
