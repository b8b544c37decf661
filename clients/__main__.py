"""``python -m clients``: the ``kernelscope`` command line (clients.cli), all five commands."""

from clients.cli import app

if __name__ == "__main__":
    app(prog_name="kernelscope")
