"""kernelscope clients: HTTP client, per-sequence gradient capture, trainer integrations, CLI."""
