"""ptserve prompts: artifacts, the prompted forward, prompt stores; no web framework here."""
