"""Teacher engine adapters (llama.cpp in process, OpenAI-compatible upstream)."""
