"""kernelscope sketch core: sketch operators, kernel statistics and entropy estimators (no I/O)."""
