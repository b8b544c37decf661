"""Exact per-token shares of dH1 (clients/token_shares.py) against autograd and the kernel."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from clients.capture import SequenceBatch, capture_gradients, forward_logits, sequence_logprobs
from clients.token_shares import (
    entropy_gradient,
    token_derivatives,
    token_shares,
    token_shares_u_statistic,
)
from sketch.entropy import entropy_change, entropy_coefficients
from sketch.sequences import Role, StepSequences
from tests.clients.conftest import make_batch

ETA = 0.3


def test_jvp_equals_autograd_per_token_gradients_dotted_with_v(
    model: nn.Module, batch: SequenceBatch
) -> None:
    """``<v, grad log pi(y_{i,t})>`` and ``<v, grad H_{i,t}>`` from the one forward-mode pass
    equal, token by token, the autograd gradients of that token's log-prob and of its
    position's full next-token entropy (each sequence alone, unpadded) dotted with v; 0 off the
    response positions."""
    gen = torch.Generator().manual_seed(3)
    v = {
        n: torch.randn(p.shape, generator=gen)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    found = token_derivatives(model, batch, v, temperature=0.8, entropy=True)
    logprobs, derivative, entropy = found.logprobs, found.logprob, found.entropy
    assert entropy is not None
    # the pass's contiguous-input hook on the LM head is gone after it
    assert not model.get_output_embeddings()._forward_pre_hooks
    model.eval()
    params = [p for n, p in model.named_parameters() if n in v]
    names = [n for n, _ in model.named_parameters() if n in v]
    for i in range(batch.size):
        length = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :length]
        logits = forward_logits(model, ids[None])[0] / 0.8
        for t in range(batch.input_ids.shape[1]):
            if t >= length or not batch.response_mask[i, t]:
                assert derivative[i, t] == 0.0 and entropy[i, t] == 0.0
                continue
            logp = torch.log_softmax(logits[t - 1], -1)
            token = logp[ids[t]]
            assert float(logprobs[i, t]) == pytest.approx(token.item(), rel=1e-5)
            for value, got in ((token, derivative), (-(logp.exp() * logp).sum(), entropy)):
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                expected = sum(
                    float((g * v[n]).sum())
                    for n, g in zip(names, grads, strict=True)
                    if g is not None
                )
                assert float(got[i, t]) == pytest.approx(expected, rel=2e-4, abs=1e-5)


def step_sequences(
    update: SequenceBatch, entropy: SequenceBatch, model: nn.Module
) -> StepSequences:
    """Update rows (2 prompts, advantages +-1, unit weights) then entropy-role rows."""
    s_update = sequence_logprobs(model, update).double().numpy()
    s_entropy = sequence_logprobs(model, entropy).double().numpy()
    n, m = update.size, entropy.size
    return StepSequences(
        ids=[f"u{i}" for i in range(n)] + [f"e{j}" for j in range(m)],
        prompt_ids=[f"p{i % 2}" for i in range(n)] + [f"p{j % 2}" for j in range(m)],
        logprob=np.concatenate([s_update, s_entropy]),
        advantage=np.concatenate([(-1.0) ** np.arange(n), np.zeros(m)]),
        num_tokens=np.concatenate([update.num_tokens.numpy(), entropy.num_tokens.numpy()]),
        role=[Role.UPDATE] * n + [Role.ENTROPY] * m,
        weight=np.concatenate([np.full(n, 0.25), np.full(m, np.nan)]),
    )


def test_shares_add_up_to_each_a_i_and_to_the_kernels_dh1(model: nn.Module) -> None:
    """On a plain on-policy step (``c_{i,t} = weight_i A_i``), the token shares summed over
    ``t`` are the ``a_i`` of the ``independent`` estimator computed from the exact kernel of
    the captured score gradients, and their total is its ``delta_h1``, to float precision."""
    update, entropy = make_batch(seed=1, n=6), make_batch(seed=2, n=4)
    seqs = step_sequences(update, entropy, model)
    h = entropy_coefficients(seqs, seqs.entropy_mask)[update.size :]
    c = torch.from_numpy(seqs.advantage[: update.size] * 0.25).float()
    coefficients = c[:, None].expand_as(update.input_ids).clone()
    shares = token_shares(
        model, update, coefficients, entropy, torch.from_numpy(h).float(), ETA
    ).shares
    assert not shares[~update.response_mask].any()

    rows = []
    for b in (update, entropy):
        captured = capture_gradients(model, b, chunk_size=b.size)
        rows.append(
            torch.cat([g.reshape(b.size, -1) for g in captured.gradients.values()], 1).double()
        )
    W = torch.cat(rows).numpy()
    result = entropy_change(W @ W.T, seqs, ETA, estimator="independent")
    a = np.array([s.a for s in result.per_sequence[: update.size]])
    np.testing.assert_allclose(shares.sum(1).double().numpy(), a, rtol=1e-4, atol=1e-7)
    assert float(shares.sum()) == pytest.approx(result.delta_h1, rel=1e-4)


def test_entropy_gradient_is_the_weighted_sum_of_score_gradients(
    model: nn.Module, batch: SequenceBatch
) -> None:
    """``v = sum_j h_j w_j`` with the captured per-sequence ``w_j``, and with ``beta`` ``+ sum_j
    beta_j z_j`` with the captured gradients ``z_j`` of the entropy sums."""
    h = torch.linspace(-1.0, 1.0, batch.size)
    v = entropy_gradient(model, batch, h)
    captured = capture_gradients(model, batch, chunk_size=batch.size)
    for name, g in captured.gradients.items():
        torch.testing.assert_close(v[name], torch.einsum("n,n...->...", h, g), rtol=1e-4, atol=1e-6)
    # from the entropy sums: sum_j h_j w_j + beta_j z_j, z_j = grad sum_t H_t (math.md §3)
    beta = torch.linspace(0.5, 2.0, batch.size)
    v = entropy_gradient(model, batch, h, beta=beta)
    mask = batch.response_mask.float()
    z = capture_gradients(model, batch, chunk_size=batch.size, entropy_coefficients=mask)
    for name, g in captured.gradients.items():
        want = torch.einsum("n,n...->...", h, g) + torch.einsum(
            "n,n...->...", beta, z.gradients[name]
        )
        torch.testing.assert_close(v[name], want, rtol=1e-4, atol=1e-6)


def test_u_statistic_shares_drop_the_self_term_and_add_up(model: nn.Module) -> None:
    """Without entropy-role sequences (``E = U``): the ``u_statistic`` token shares summed per
    sequence are its ``a_i`` from the exact kernel (pairs ``j != i``, same-prompt pairs weighted
    ``M/(M-1)``), their total its ``delta_h1``; the plain ``v`` of all sequences (the
    self-term kept) gives the ``plugin`` ``a_i`` instead, a different number."""
    update = make_batch(seed=4, n=6)
    seqs = step_sequences(update, make_batch(seed=2, n=2), model).subset(list(range(update.size)))
    upd = seqs.update_mask
    h = torch.from_numpy(entropy_coefficients(seqs, upd)).float()
    c = torch.from_numpy(seqs.advantage * 0.25).float()
    coefficients = c[:, None].expand_as(update.input_ids).clone()
    shares = token_shares_u_statistic(model, update, seqs.prompt_ids, coefficients, h, ETA).shares
    plugin_shares = token_shares(model, update, coefficients, update, h, ETA).shares
    captured = capture_gradients(model, update, chunk_size=update.size)
    W = torch.cat([g.reshape(update.size, -1) for g in captured.gradients.values()], 1).double()
    K = (W @ W.T).numpy()
    for estimator, got in (("u_statistic", shares), ("plugin", plugin_shares)):
        result = entropy_change(K, seqs, ETA, estimator=estimator)
        a = np.array([s.a for s in result.per_sequence])
        np.testing.assert_allclose(got.sum(1).double().numpy(), a, rtol=1e-4, atol=1e-7)
        assert float(got.sum()) == pytest.approx(result.delta_h1, rel=1e-4)
    assert not torch.allclose(shares.sum(1), plugin_shares.sum(1), rtol=1e-3)


@pytest.mark.parametrize(("chunk_size", "geometry"), [(4, "sgd"), (16, "sgd"), (4, "adam")])
def test_cross_fit_shares_pair_each_half_with_the_other_and_add_up(
    model: nn.Module, chunk_size: int, geometry: str
) -> None:
    """Without entropy-role sequences: the ``cross_fit`` token shares (each prompt's sequences
    split into halves by id, a token's direction from the other half alone) summed per sequence
    are the ``cross_fit`` ``a_i`` of the exact kernel, and their total its ``delta_h1``, to float
    precision, whether the passes take the 6 sequences in chunks of 4 or at once, and in
    ``adam`` geometry (rows scaled by a ``sqrt(P)``, which the shares leave as it was).  They
    are not the ``u_statistic`` shares (different pairs, different ``h``)."""
    from clients.token_shares import token_shares_cross_fit
    from sketch.entropy import estimator_entropy_coefficients

    update = make_batch(seed=4, n=6)
    seqs = step_sequences(update, make_batch(seed=2, n=2), model).subset(list(range(update.size)))
    h = torch.from_numpy(estimator_entropy_coefficients(seqs, "cross_fit")).float()
    c = torch.from_numpy(seqs.advantage * 0.25).float()
    coefficients = c[:, None].expand_as(update.input_ids).clone()
    gen = torch.Generator().manual_seed(5)
    sqrt_p: dict[str, torch.Tensor] = {}
    if geometry == "adam":
        sqrt_p = {n: 0.5 + torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    kept = {n: t.clone() for n, t in sqrt_p.items()}
    shares = token_shares_cross_fit(
        model,
        update,
        seqs.ids,
        seqs.prompt_ids,
        coefficients,
        h,
        ETA,
        chunk_size=chunk_size,
        sqrt_p=sqrt_p or None,
    ).shares
    assert not shares[~update.response_mask].any()
    assert all(torch.equal(sqrt_p[n], kept[n]) for n in kept)
    # the passes take each chunk without the padding columns its rows share
    lengths = update.attention_mask.sum(1)
    shortest = torch.argsort(lengths)[:2].tolist()
    assert update.select(shortest).trimmed().input_ids.shape[1] == int(lengths[shortest].max())
    assert int(lengths[shortest].max()) < update.input_ids.shape[1]
    captured = capture_gradients(model, update, chunk_size=update.size)
    W = torch.cat(
        [
            g.reshape(update.size, -1) * (sqrt_p[n].reshape(-1) if sqrt_p else 1.0)
            for n, g in captured.gradients.items()
        ],
        1,
    ).double()
    K = (W @ W.T).numpy()
    result = entropy_change(K, seqs, ETA, estimator="cross_fit")
    a = np.array([s.a for s in result.per_sequence])
    np.testing.assert_allclose(shares.sum(1).double().numpy(), a, rtol=1e-4, atol=1e-7)
    assert float(shares.sum()) == pytest.approx(result.delta_h1, rel=1e-4)
    u_stat = entropy_change(K, seqs, ETA, estimator="u_statistic")
    assert result.delta_h1 != pytest.approx(u_stat.delta_h1, rel=1e-3)


@pytest.mark.parametrize("estimator", ["cross_fit", "u_statistic"])
def test_shares_with_an_entropy_bonus_add_up_to_the_update_rows_dh1(
    model: nn.Module, estimator: str
) -> None:
    """A loss with token coefficients ``c_{i,t}`` and an entropy bonus ``e_{i,t}``: the update
    rows ``u_i = sum_t c_{i,t} grad l_{i,t} + e_{i,t} grad H_{i,t}`` (captured exactly), and the
    token shares with the bonus's terms summed per sequence are the estimator's ``a_i`` of
    those update rows, their total its ``delta_h1``; without the bonus's terms they miss."""
    from clients.token_shares import token_shares_cross_fit
    from sketch.entropy import UpdateKernels, estimator_entropy_coefficients

    update = make_batch(seed=4, n=6)
    seqs = step_sequences(update, make_batch(seed=2, n=2), model).subset(list(range(update.size)))
    h = torch.from_numpy(estimator_entropy_coefficients(seqs, estimator)).float()
    gen = torch.Generator().manual_seed(9)
    coefficients = torch.randn(update.input_ids.shape, generator=gen) * update.response_mask
    bonus = 5.0 * torch.rand(update.input_ids.shape, generator=gen) * update.response_mask

    def shares(entropy_coefficients: torch.Tensor | None) -> torch.Tensor:
        if estimator == "cross_fit":
            return token_shares_cross_fit(
                model,
                update,
                seqs.ids,
                seqs.prompt_ids,
                coefficients,
                h,
                ETA,
                entropy_coefficients=entropy_coefficients,
                chunk_size=4,
            ).shares
        return token_shares_u_statistic(
            model,
            update,
            seqs.prompt_ids,
            coefficients,
            h,
            ETA,
            entropy_coefficients=entropy_coefficients,
        ).shares

    def flat(captured: Any) -> torch.Tensor:
        return torch.cat([g.reshape(update.size, -1) for g in captured.gradients.values()], 1)

    W = flat(capture_gradients(model, update, chunk_size=update.size)).double()
    U = flat(
        capture_gradients(
            model,
            update,
            chunk_size=update.size,
            token_coefficients=coefficients,
            entropy_coefficients=bonus,
        )
    ).double()
    kernels = UpdateKernels(cross=(W @ U.T).numpy(), gram=(U @ U.T).numpy())
    result = entropy_change((W @ W.T).numpy(), seqs, ETA, estimator=estimator, update=kernels)
    a = np.array([s.a for s in result.per_sequence])
    got = shares(bonus)
    np.testing.assert_allclose(got.sum(1).double().numpy(), a, rtol=1e-4, atol=1e-7)
    assert float(got.sum()) == pytest.approx(result.delta_h1, rel=1e-4)
    assert float(shares(None).sum()) != pytest.approx(result.delta_h1, rel=1e-3)
