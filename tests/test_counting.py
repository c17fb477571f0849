"""Which tokens count, agreed by every public function.

A token that one public function does not count -- its target is ``ignore_index``, it is
masked, or (unchecked, ``validate=False``) its target is outside ``[0, V)`` or excluded by a
-inf bias -- is counted by no other public function fed that function's outputs: the head
returns the tokens it counted as ``out.mask``, the losses as ``out.mask``, and
``repo_statistics`` / ``policy_loss_from_logprobs`` given that mask count exactly those tokens.
The README's gradient-accumulation recipe with Hugging Face's -100 padding and no mask of its
own therefore gives the one-batch gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st

import fused_pg
from fused_pg import RepoStats, fused_logprobs_entropy, policy_loss_from_logprobs, repo_loss, repo_statistics
from helpers import BACKENDS, assert_close, assert_grad_close, run_property


def _padded_batch(seed=0, B=4, T=7, D=8, V=23):
    """A batch padded Hugging Face style: targets -100 after each sequence's length."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) / 2
    lengths = torch.tensor([T, 3, 5, 1][:B])
    y = torch.randint(0, V, (B, T), generator=g)
    y = torch.where(torch.arange(T)[None, :] < lengths[:, None], y, -100)
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) - 0.5
    return h, W, y, adv, old


@pytest.mark.parametrize("backend", BACKENDS)
def test_readme_accumulation_recipe_with_ignore_index_padding_and_no_mask(backend):
    """The recipe: the head's outputs (and its mask) give the whole batch's statistics and
    token count; each micro-batch's loss with them sums to the one-batch loss and gradient.
    (Fed the head's log-probs without its mask, repo_statistics counts the padding as tokens
    of probability 1: 28 tokens instead of 16 here, and a gradient far from one batch's.)"""
    h, W, y, adv, old = _padded_batch()
    kw = dict(repo="decorrelate", repo_coef=0.8, entropy_coef=0.01, backend=backend)
    W1 = W.clone().requires_grad_()
    one = repo_loss(h, W1, y, adv, old, **kw)
    one.loss.backward()

    micro = [slice(0, 1), slice(1, 3), slice(3, 4)]
    with torch.no_grad():
        heads = [fused_logprobs_entropy(h[s], W, y[s], backend=backend) for s in micro]
    stats = RepoStats.merge_all([repo_statistics(out.logprobs, adv[s], out.mask) for out, s in zip(heads, micro)])
    n_tokens = int(stats.count)
    assert n_tokens == int((y != -100).sum()) == int(one.metrics["n_tokens"]) == 16
    W2 = W.clone().requires_grad_()
    total = 0.0
    for s in micro:
        out = repo_loss(h[s], W2, y[s], adv[s], old[s], repo_stats=stats, num_items_in_batch=n_tokens, **kw)
        out.loss.backward()
        total = total + out.loss.detach()
    assert_close("accumulated loss", one.loss, total, atol=1e-6, rtol=1e-5)
    assert_grad_close("accumulated grad weight", W1.grad.double(), W2.grad, cos_min=1 - 1e-9, rel_max=1e-5)
    # the statistics the loss computed itself are those of the recipe
    assert_close("Cov(A, logp)", stats.cov_adv_logprob, one.metrics["adv_logp_cov_before"], atol=1e-6, rtol=1e-5)


def test_the_readme_recipe_as_written_gives_the_one_batch_gradient():
    """The README's accumulation block (micro-batches padded to different lengths with -100,
    no mask) run as written: its accumulated weight gradient is the one-batch gradient."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S) if "pass 1 (no graph)" in b]
    assert len(blocks) == 1, "the README's gradient-accumulation block"
    scope = {"__name__": "__readme__"}
    exec(compile(blocks[0], "README.md (accumulation)", "exec"), scope)
    micro, weight = scope["micro"], scope["weight"]
    T = max(m["targets"].shape[1] for m in micro)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1]) if x.dim() == 3 else (0, T - x.shape[1]),
                                       value=value)

    whole = dict(hidden=torch.cat([pad(m["hidden"], 0.0) for m in micro]),
                 targets=torch.cat([pad(m["targets"], -100) for m in micro]),
                 advantages=torch.cat([m["advantages"] for m in micro]),
                 old_logprobs=torch.cat([pad(m["old_logprobs"], 0.0) for m in micro]))
    W = weight.detach().clone().requires_grad_()
    one = repo_loss(whole["hidden"], W, whole["targets"], whole["advantages"], whole["old_logprobs"])
    one.loss.backward()
    assert int(scope["n_tokens"]) == int(one.metrics["n_tokens"]) == int((whole["targets"] != -100).sum())
    assert_grad_close("README recipe: accumulated grad weight", W.grad.double(), weight.grad,
                      cos_min=1 - 1e-9, rel_max=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_from_the_heads_outputs_equals_repo_loss(backend):
    """repo_loss skips -100 targets itself; policy_loss_from_logprobs fed the head's outputs
    and mask gives the same loss, the same count and the same gradient."""
    h, W, y, adv, old = _padded_batch(1)
    kw = dict(repo="fixed", repo_coef=0.3, entropy_coef=0.05)
    W1, W2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    one = repo_loss(h, W1, y, adv, old, backend=backend, **kw)
    one.loss.backward()
    head = fused_logprobs_entropy(h, W2, y, backend=backend)
    two = policy_loss_from_logprobs(head.logprobs, adv, old, head.mask, entropy=head.entropy, **kw)
    two.loss.backward()
    assert torch.equal(head.mask, y != -100) and torch.equal(one.mask, head.mask) and torch.equal(two.mask, head.mask)
    assert float(two.metrics["n_tokens"]) == float(one.metrics["n_tokens"]) == 16
    assert_close("loss", one.loss, two.loss, atol=1e-6, rtol=1e-5)
    assert_grad_close("grad weight", W1.grad.double(), W2.grad, cos_min=1 - 1e-9, rel_max=1e-5)


def test_head_output_unpacks_as_a_pair_and_survives_pickling():
    import pickle

    h, W, y, _, _ = _padded_batch(2)
    out = fused_logprobs_entropy(h, W, y)
    logp, ent = out
    assert logp is out.logprobs and ent is out.entropy and len(out) == 2
    back = pickle.loads(pickle.dumps(out))
    assert torch.equal(back.logprobs, logp) and torch.equal(back.mask, out.mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_target_on_an_excluded_id_does_not_count(backend):
    """validate=False (the GPU default): a target whose bias is -inf would have logp = -inf;
    with REPO that made the loss and all of dW NaN. It does not count, like an id outside
    [0, V): the same loss and gradients as masking it, on every backend, the head's output 0."""
    h, W, y, adv, old = _padded_batch(3)
    V = W.shape[0]
    bias = 0.2 * torch.randn(V, generator=torch.Generator().manual_seed(0))
    bias[-2:] = -math.inf
    y = y.clone()
    y[0, 2], y[2, 0] = V - 1, V - 2  # excluded, counted positions
    excluded = torch.zeros_like(y, dtype=torch.bool)
    excluded[0, 2] = excluded[2, 0] = True
    mask = torch.ones_like(y, dtype=torch.bool)
    results = []
    for m in (mask, ~excluded):
        WW, bb = W.clone().requires_grad_(), bias.clone().requires_grad_()
        out = repo_loss(h, WW, y, adv, old, m, bias=bb, validate=False, backend=backend, entropy_coef=0.01)
        out.loss.backward()
        results.append((out, WW.grad, bb.grad))
    (out, dW, db), (want, want_dW, want_db) = results
    assert torch.isfinite(out.loss) and torch.isfinite(dW).all() and torch.isfinite(db).all()
    assert_close("loss with excluded targets vs masked", want.loss, out.loss, atol=1e-6, rtol=1e-5)
    assert float(out.metrics["n_tokens"]) == float(want.metrics["n_tokens"])
    assert not out.mask[excluded].any()
    assert_grad_close("grad weight", want_dW.double(), dW, cos_min=1 - 1e-9, rel_max=1e-5)
    assert_grad_close("grad bias", want_db.double(), db, cos_min=1 - 1e-9, rel_max=1e-5)
    head = fused_logprobs_entropy(h, W, y, bias=bias, validate=False, backend=backend)
    assert (head.logprobs[excluded] == 0).all() and (head.entropy[excluded] == 0).all()
    assert not head.mask[excluded].any() and torch.isfinite(head.logprobs).all()
    with pytest.raises(ValueError, match="bias is -inf"):
        repo_loss(h, W, y, adv, old, bias=bias, validate=True, backend=backend)


# ---------------------------------------------------------------------------------------------
# the invariant, over generated inputs
# ---------------------------------------------------------------------------------------------

@st.composite
def counting_cases(draw):
    """A head batch whose targets mix ids that count with ignore_index, ids outside [0, V) and
    ids a -inf bias excludes, and a mask of its own (or none)."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    V, D = draw(st.integers(3, 12)), draw(st.integers(1, 5))
    kinds = draw(st.lists(st.sampled_from(["id", "id", "ignore", "outside", "excluded"]), min_size=B * T,
                          max_size=B * T))
    return dict(B=B, T=T, V=V, D=D, kinds=kinds, ignore_index=draw(st.sampled_from([-100, -1])),
                mask=draw(st.sampled_from(["none", "random", "all_masked"])), seed=draw(st.integers(0, 2**31 - 1)),
                per_seq=draw(st.booleans()), aggregation=draw(st.sampled_from(fused_pg.config.AGGREGATIONS)))


def _build(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, T, V, D = case["B"], case["T"], case["V"], case["D"]
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    bias = torch.zeros(V, dtype=torch.float64)
    bias[-1] = -math.inf  # id V - 1 is excluded
    ids = torch.randint(0, V - 1, (B * T,), generator=g)
    outside = torch.where(torch.rand(B * T, generator=g) < 0.5, -7, V + 3)  # never ignore_index
    table = {"id": ids, "ignore": torch.full_like(ids, case["ignore_index"]), "outside": outside,
             "excluded": torch.full_like(ids, V - 1)}
    y = torch.stack([table[k][i] for i, k in enumerate(case["kinds"])]).view(B, T)
    counts = torch.tensor([k == "id" for k in case["kinds"]]).view(B, T)
    if case["mask"] == "none":
        mask = None
    elif case["mask"] == "random":
        mask = torch.rand(B, T, generator=g) > 0.3
    else:
        mask = torch.zeros(B, T, dtype=torch.bool)
    adv = torch.randn(B if case["per_seq"] else (B, T), generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.2
    return h, W, bias, y, counts, mask, adv, old


def _check_counting(case):
    h, W, bias, y, counts, mask, adv, old = _build(case)
    kw = dict(ignore_index=case["ignore_index"], validate=False, backend="torch")
    loss_kw = dict(aggregation=case["aggregation"], repo="decorrelate", entropy_coef=0.02)
    user = mask if mask is not None else torch.ones_like(counts)
    expected = counts & user

    head = fused_logprobs_entropy(h, W, y, bias=bias, **kw)
    assert torch.equal(head.mask, counts), "the head's mask is not the tokens it counted"
    assert (head.logprobs[~counts] == 0).all() and (head.entropy[~counts] == 0).all()
    assert torch.isfinite(head.logprobs).all() and torch.isfinite(head.entropy).all()

    full = repo_loss(h, W, y, adv, old, mask, bias=bias, **kw, **loss_kw)
    assert torch.equal(full.mask, expected)
    assert float(full.metrics["n_tokens"]) == int(expected.sum())
    assert torch.isfinite(full.loss)

    # fed the head's outputs, every other function counts the same tokens
    fed = head.mask & user
    stats = repo_statistics(head.logprobs, adv, fed, validate=False)
    assert float(stats.count) == int(expected.sum())
    stats_from_loss = repo_statistics(full.logprobs, adv, full.mask, validate=False)
    assert float(stats_from_loss.count) == float(stats.count)
    # (the head and the loss sweep different rows: log-probs equal up to rounding)
    assert_close("statistics from the loss's outputs", stats.as_tensor(), stats_from_loss.as_tensor(),
                 atol=1e-12, rtol=1e-10)
    from_logprobs = policy_loss_from_logprobs(head.logprobs, adv, old, fed, entropy=head.entropy, validate=False,
                                              **loss_kw)
    assert torch.equal(from_logprobs.mask, expected)
    assert float(from_logprobs.metrics["n_tokens"]) == int(expected.sum())
    assert_close("repo_loss vs policy_loss_from_logprobs on the head's outputs", full.loss, from_logprobs.loss,
                 atol=1e-12, rtol=1e-10)
    for key in ("adv_logp_cov_before", "repo_zeta", "entropy_mean", "n_seqs"):
        assert_close(key, full.metrics[key], from_logprobs.metrics[key], atol=1e-12, rtol=1e-10)
    # and the loss given those statistics and the count equals the loss that computed its own
    again = repo_loss(h, W, y, adv, old, mask, bias=bias, repo_stats=stats, **kw, **loss_kw)
    assert_close("loss with the fed statistics", full.loss, again.loss, atol=1e-12, rtol=1e-10)


def test_a_token_one_function_does_not_count_no_other_counts():
    run_property(counting_cases(), _check_counting, examples=60)
