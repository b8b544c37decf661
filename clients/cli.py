"""The ``kernelscope`` command line (typer + rich).

Client commands, defined here: ``runs`` and ``report`` (read the REST API with
:class:`clients.http.Client`, tables from ``clients.report``) and ``demo`` (a tiny GRPO trainer
feeding the service; ``clients.demo``).  The service's commands ``serve`` and ``worker`` are
``service.cli``'s, loaded only when one of them is run or listed, so that the client commands
(and ``import clients``) never load the server.  docs/cli.md has the walkthrough.
"""

from __future__ import annotations

import functools
import importlib
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from clients.errors import KernelscopeError, TransportError

if TYPE_CHECKING:
    from clients.http import Client

DEFAULT_URL = "http://127.0.0.1:8000"
#: The commands ``service.cli`` defines, listed first as they always were.
SERVICE_COMMANDS = ("serve", "worker")


class KernelscopeGroup(TyperGroup):
    """The client commands plus ``service.cli``'s, imported on first use.

    ``ctx`` and the command are click's types, left as ``Any``: recent typers vendor click
    (``typer._click``), older ones use click itself.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return [*SERVICE_COMMANDS, *super().list_commands(ctx)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in SERVICE_COMMANDS:
            return _service_group().get_command(ctx, cmd_name)
        return super().get_command(ctx, cmd_name)


@functools.cache
def _service_group() -> Any:
    """``service.cli``'s app as a click group (built once: ``--help`` asks for each command)."""
    return typer.main.get_group(importlib.import_module("service.cli").app)


app = typer.Typer(
    name="kernelscope",
    cls=KernelscopeGroup,
    help=(
        "kernelscope: sketched Fisher kernels and entropy-change predictions "
        "for RL fine-tuning.\n\n"
        "Start the service with `kernelscope serve` (no setup: it runs its own Redis), point a "
        "trainer at the URL it prints, then read results with `kernelscope runs` and "
        "`kernelscope report RUN [STEP]`. Settings come from KERNELSCOPE_* environment "
        "variables (docs/deployment.md) and REDIS_URL."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _out() -> Console:
    """A console for stdout, made per command so that it sees the current COLUMNS and stream."""
    return Console()


def _err() -> Console:
    return Console(stderr=True)


UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="KERNELSCOPE_URL",
        help="Base URL of the kernelscope API.",
        show_default=True,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="KERNELSCOPE_TOKEN",
        help="Bearer token, when the service sets KERNELSCOPE_TOKEN.",
        show_default=False,
    ),
]


def _report_error(exc: KernelscopeError, url: str) -> typer.Exit:
    if isinstance(exc, TransportError):
        _err().print(f"[red]error:[/red] cannot reach the service at {url}: {exc.detail}")
    else:
        _err().print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=1)


def _client(url: str, token: str | None, wait_s: float = 0.0) -> Client:
    """A client for one interactive command: few retries (a person is waiting), and room in
    the timeout for a server-side ``?wait=``."""
    from clients.http import Client, RetryPolicy

    return Client(url, token=token, timeout=60.0 + wait_s, retry=RetryPolicy(attempts=3))


@app.command()
def runs(url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """List the runs a kernelscope service holds (GET /v1/runs): sketch, k, seed, steps.

    Example:

        kernelscope runs --url http://127.0.0.1:8000
    """
    from clients.report import run_list

    try:
        with _client(url, token) as client:
            tables = run_list(client)
    except KernelscopeError as exc:
        raise _report_error(exc, url) from exc
    for table in tables:
        _out().print(table)


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="The run id.", show_default=False)],
    step: Annotated[
        int | None,
        typer.Argument(help="A step; without it, the run's history.", show_default=False),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    estimator: Annotated[
        str | None,
        typer.Option(
            help=(
                "dH1 estimator: independent, u_statistic, plugin or cross_fit."
                " [default: the service's]"
            ),
            show_default=False,
        ),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="Rows of the kernel statistics: update, entropy or all. [default: update]",
            show_default=False,
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="Which entropy: sequence (nats per response) or token_mean (nats per token, "
            "what TRL and verl log as entropy; needs the trainer's entropy sums).",
        ),
    ] = "sequence",
    top: Annotated[
        int,
        typer.Option(
            min=1,
            help="Sequences in the 'driving entropy down' table, and tokens in each tokens table.",
        ),
    ] = 10,
    head: Annotated[int, typer.Option(min=1, help="Eigenvalues in the spectrum head.")] = 10,
    wait: Annotated[
        float,
        typer.Option(
            min=0, max=300, help="Seconds to wait for a step whose uploads are still queued."
        ),
    ] = 0.0,
    kl_cov_ratio: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="KL-Cov's fraction of tokens in the covariance line. [default: the service's, "
            "verl's 0.0002]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print what kernelscope knows about a run or one of its steps, as tables.

    With STEP: the step's state and row counts; the predicted entropy change dH1 with its
    error bars (se_sampling, se_sketch), the realized change and their ratio, dH1_applied,
    dH2, cov_baseline and dH1_diag; dH1 split by pair type, by quadrant (advantage sign x
    log-prob above/below the prompt mean) and by parameter group; the sequences driving
    entropy down; the head of the kernel's spectrum with effective rank and participation
    ratio; kernel block statistics; when the trainer pushed token shares, the tokens
    pushing entropy down and up most (text, exact share of dH1, covariance score) and how
    KL-Cov's and Clip-Cov's picks compare with them. docs/math.md defines every number.

    Without STEP: one row per analysed step (GET /v1/runs/RUN/entropy).

    Examples:

        kernelscope report grpo-demo

        kernelscope report grpo-demo 12 --estimator plugin --top 20

        kernelscope report grpo-demo 12 --kl-cov-ratio 0.01

        kernelscope report grpo-demo --target token_mean
    """
    from clients.report import run_history, step_report

    try:
        with _client(url, token, wait) as client:
            if step is None:
                tables = run_history(client, run, target=target)
            else:
                tables = step_report(
                    client,
                    run,
                    step,
                    estimator=estimator,
                    target=target,
                    role=role,
                    top=top,
                    head=head,
                    wait_s=wait or None,
                    kl_cov_ratio=kl_cov_ratio,
                )
    except KernelscopeError as exc:
        raise _report_error(exc, url) from exc
    for table in tables:
        _out().print(table)
        _out().print()


class Capture(str, Enum):
    """How the demo trainer gets per-sequence gradients to the service."""

    exact = "exact"
    factorised = "factorised"


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=1, help="GRPO steps to train.")] = 20,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Use this running service instead of starting one (embedded, temporary data).",
            show_default=False,
        ),
    ] = None,
    token: TokenOption = None,
    capture: Annotated[
        Capture,
        typer.Option(
            help="exact: per-sequence gradients pushed raw, sketched by the service "
            "(countsketch); factorised: kronecker sketches made by hooks in the trainer."
        ),
    ] = Capture.exact,
    keep_alive: Annotated[
        bool,
        typer.Option(
            "--keep-alive/--exit",
            help="After training, keep the service up for the dashboard until Ctrl-C.",
        ),
    ] = True,
    entropy_sum_rows: Annotated[
        bool,
        typer.Option(
            "--entropy-sum-rows",
            help="Also push each response's entropy-sum gradient: grad H from the entropy sums, "
            "error bars about a tenth as wide (docs/math.md §3).",
        ),
    ] = False,
) -> None:
    """Train a tiny GPT-2 with GRPO on the CPU and watch kernelscope predict its entropy.

    Starts the service (unless --url is given), builds a 26k-parameter GPT-2 from a config
    (nothing is downloaded), trains it for --steps GRPO steps on a toy task, pushes every
    step's sequences and gradients, and prints one row per step: the predicted entropy
    change dH1 with its error bars, the realized change, their ratio, and the sequences
    pushing entropy down hardest. Then it leaves the dashboard up until Ctrl-C.

    Examples:

        kernelscope demo

        kernelscope demo --steps 5 --exit

        kernelscope demo --url http://127.0.0.1:8000 --capture factorised
    """
    # Imported here so that the other commands never load the trainer (transformers).
    from clients.demo import DemoConfig, run_demo

    run_demo(
        steps=steps,
        url=url,
        keep_alive=keep_alive,
        token=token,
        config=DemoConfig(capture=capture.value, entropy_sum_rows=entropy_sum_rows),
        console=_out(),
    )
