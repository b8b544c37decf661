"""``/v1/runs/{run_id}/steps/{step}/tokens``: the exact share of each update token in the
step's ``dH1``, pushed by the trainer, and Cui et al.'s token covariance held against it
(math.md §9)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service import analysis as an
from service.deps import RunDep, StepNo, StoreDep
from service.errors import ProblemError
from service.schemas import TokensIn, TokensOut, TokensRecorded
from sketch.token_covariance import (
    CLIP_COV_LB,
    CLIP_COV_RATIO,
    CLIP_COV_UB,
    KL_COV_RATIO,
    CovarianceOptions,
)

router = APIRouter(prefix="/v1/runs/{run_id}/steps", tags=["tokens"])


@router.post("/{step}/tokens", response_model=TokensRecorded)
async def post_tokens(run: RunDep, step: StepNo, body: TokensIn, store: StoreDep) -> TokensRecorded:
    """Upsert the token shares of update sequences (after the step's sequences); a re-sent
    push replaces its sequences' shares."""
    return await an.record_tokens(store, run, step, body)


@router.get("/{step}/tokens", response_model=TokensOut)
async def get_tokens(
    run: RunDep,
    step: StepNo,
    store: StoreDep,
    top: Annotated[int, Query(ge=1, le=1000, description="tokens in down and up")] = 20,
    sequence: Annotated[
        str | None, Query(max_length=128, description="every token of this sequence")
    ] = None,
    kl_cov_ratio: Annotated[
        float, Query(gt=0, le=1, description="KL-Cov's fraction of tokens (verl: 0.0002)")
    ] = KL_COV_RATIO,
    clip_cov_ratio: Annotated[
        float, Query(gt=0, le=1, description="Clip-Cov's fraction of tokens (verl: 0.0002)")
    ] = CLIP_COV_RATIO,
    clip_cov_lb: Annotated[float, Query(description="Clip-Cov's lower bound (verl: 1)")] = (
        CLIP_COV_LB
    ),
    clip_cov_ub: Annotated[float, Query(description="Clip-Cov's upper bound (verl: 5)")] = (
        CLIP_COV_UB
    ),
) -> TokensOut:
    """The tokens pushing the entropy down and up most, each sequence's total (its ``a_i``),
    one sequence's tokens in order, and how KL-Cov's and Clip-Cov's choices compare."""
    try:
        options = CovarianceOptions(kl_cov_ratio, clip_cov_ratio, clip_cov_lb, clip_cov_ub)
    except ValueError as exc:
        raise ProblemError(422, str(exc)) from None
    return await an.step_tokens(store, run, step, top=top, sequence=sequence, options=options)
