"""kernelscope clients: HTTP client, per-sequence gradient capture and trainer integrations."""
