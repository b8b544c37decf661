"""kernelscope service: REST API, Redis store, stream workers, embedded mode and CLI."""
