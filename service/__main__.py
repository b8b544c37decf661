"""``python -m service``: the ``kernelscope`` command line (service.cli)."""

from service.cli import app

if __name__ == "__main__":
    app(prog_name="kernelscope")
