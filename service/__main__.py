"""``python -m service``: the service's commands ``serve`` and ``worker`` (service.cli).

The ``kernelscope`` console script (``python -m clients``) has these and the client commands.
"""

from service.cli import app

if __name__ == "__main__":
    app(prog_name="kernelscope")
