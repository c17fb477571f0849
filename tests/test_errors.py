"""Bad input raises the documented error type, and the message names the argument.

Each case starts from a valid call and breaks one thing. Device mismatches cannot be built on
a CPU-only machine: that test is marked ``cuda`` and skips there.
"""

import math

import pytest
import torch

import fused_pg
from fused_pg import AdaptiveClip, adapo_loss, fused_logprobs_entropy, repo_loss
from helpers import BACKENDS, TF32_BACKENDS

B, T, D, V = 2, 5, 7, 11  # odd sizes


def _valid(packed=False):
    g = torch.Generator().manual_seed(0)
    lead = (B * T,) if packed else (B, T)
    args = dict(
        hidden=torch.randn(*lead, D, generator=g),
        weight=torch.randn(V, D, generator=g),
        targets=torch.randint(0, V, lead, generator=g),
        advantages=torch.randn(lead, generator=g),
        old_logprobs=-torch.rand(lead, generator=g) - 1,
        mask=torch.ones(lead, dtype=torch.bool),
    )
    kwargs = dict(bias=torch.zeros(V), ref_logprobs=-torch.rand(lead, generator=g) - 1)
    return args, kwargs


def _call(args, kwargs, fn=repo_loss):
    a = dict(args)
    return fn(a.pop("hidden"), a.pop("weight"), a.pop("targets"), a.pop("advantages"), a.pop("old_logprobs"),
              a.pop("mask"), **kwargs)


def test_masked_targets_may_point_anywhere():
    """Only counted tokens are checked: padding may carry an excluded or out-of-range id."""
    args, kwargs = _valid()
    targets, mask = args["targets"].clone(), args["mask"].clone()
    targets[0, :2] = torch.tensor([0, V + 5])
    mask[0, :2] = False
    bias = torch.zeros(V)
    bias[0] = -math.inf
    targets[targets == 0] = 1
    targets[0, 0] = 0
    out = _call({**args, "targets": targets, "mask": mask}, {**kwargs, "bias": bias})
    assert torch.isfinite(out.loss) and torch.isfinite(out.logprobs).all()


def test_valid_call_passes():
    args, kwargs = _valid()
    out = _call(args, kwargs)
    assert torch.isfinite(out.loss)
    args, kwargs = _valid(packed=True)
    out = _call(args, {**kwargs, "cu_seqlens": torch.tensor([0, 4, 4, B * T])})
    assert torch.isfinite(out.loss)


def _nan_at(x, value=math.nan, index=0):
    x = x.clone()
    x.view(-1)[index] = value
    return x


# (id, change to the positional args, change to the keyword args, error type, regex on the message)
ARG_CASES = [
    # --- shapes --------------------------------------------------------------------------------
    ("hidden 1-D", dict(hidden=torch.randn(D)), {}, ValueError, "hidden"),
    ("hidden 4-D", dict(hidden=torch.randn(1, B, T, D)), {}, ValueError, "hidden"),
    ("weight 1-D", dict(weight=torch.randn(V)), {}, ValueError, "weight"),
    ("weight wrong D", dict(weight=torch.randn(V, D + 1)), {}, ValueError, "weight"),
    ("weight transposed", dict(weight=torch.randn(D, V)), {}, ValueError, "weight"),
    ("targets shape", dict(targets=torch.zeros(B, T + 1, dtype=torch.long)), {}, ValueError, "targets"),
    ("targets flat", dict(targets=torch.zeros(B * T, dtype=torch.long)), {}, ValueError, "targets"),
    ("advantages shape", dict(advantages=torch.randn(B, T + 1)), {}, ValueError, "advantages"),
    ("advantages per-seq wrong count", dict(advantages=torch.randn(B + 1)), {}, ValueError, "advantages"),
    ("old_logprobs shape", dict(old_logprobs=torch.randn(B * T)), {}, ValueError, "old_logprobs"),
    ("mask shape", dict(mask=torch.ones(B, T - 1, dtype=torch.bool)), {}, ValueError, "mask"),
    ("bias shape", {}, dict(bias=torch.zeros(V + 1)), ValueError, "bias"),
    ("bias 2-D", {}, dict(bias=torch.zeros(1, V)), ValueError, "bias"),
    ("ref_logprobs shape", {}, dict(ref_logprobs=torch.zeros(B, T + 2)), ValueError, "ref_logprobs"),
    ("rollout_logprobs shape", {}, dict(rollout_logprobs=torch.zeros(T), tis_cap=2.0), ValueError, "rollout_logprobs"),
    ("empty vocabulary", dict(weight=torch.randn(0, D)), dict(bias=None), ValueError, "weight"),
    ("zero hidden size", dict(hidden=torch.randn(B, T, 0), weight=torch.randn(V, 0)), {}, ValueError, "hidden"),
    # --- dtypes and types --------------------------------------------------------------------------
    ("hidden int", dict(hidden=torch.ones(B, T, D, dtype=torch.int32)), {}, TypeError, "hidden"),
    ("hidden complex", dict(hidden=torch.ones(B, T, D, dtype=torch.complex64)), {}, TypeError, "hidden"),
    ("hidden not a tensor", dict(hidden=[[1.0] * D]), {}, TypeError, "hidden"),
    ("weight int", dict(weight=torch.ones(V, D, dtype=torch.int64)), {}, TypeError, "weight"),
    ("targets float", dict(targets=torch.zeros(B, T)), {}, TypeError, "targets"),
    ("targets bool", dict(targets=torch.zeros(B, T, dtype=torch.bool)), {}, TypeError, "targets"),
    ("advantages int", dict(advantages=torch.ones(B, T, dtype=torch.int64)), {}, TypeError, "advantages"),
    ("old_logprobs int", dict(old_logprobs=torch.ones(B, T, dtype=torch.int64)), {}, TypeError, "old_logprobs"),
    ("bias int", {}, dict(bias=torch.zeros(V, dtype=torch.int64)), TypeError, "bias"),
    ("ref_logprobs int", {}, dict(ref_logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError, "ref_logprobs"),
    ("mask complex", dict(mask=torch.ones(B, T, dtype=torch.complex64)), {}, TypeError, "mask"),
    ("ignore_index float", {}, dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("validate not bool", {}, dict(validate="yes"), TypeError, "validate"),
    ("temperature str", {}, dict(temperature="1"), TypeError, "temperature"),
    ("eps_low bool", {}, dict(eps_low=True), TypeError, "eps_low"),
    ("deterministic not bool", {}, dict(deterministic=1), TypeError, "deterministic"),
    ("repo_center not a name", {}, dict(repo_center=1), TypeError, "repo_center"),
    ("repo_center unknown", {}, dict(repo_center="sequence"), ValueError, "repo_center"),
    # --- values ------------------------------------------------------------------------------------
    ("hidden NaN", dict(hidden=_nan_at(torch.randn(B, T, D))), {}, ValueError, "hidden"),
    ("hidden Inf", dict(hidden=_nan_at(torch.randn(B, T, D), math.inf)), {}, ValueError, "hidden"),
    ("weight NaN", dict(weight=_nan_at(torch.randn(V, D))), {}, ValueError, "weight"),
    ("weight -Inf", dict(weight=_nan_at(torch.randn(V, D), -math.inf)), {}, ValueError, "weight"),
    ("advantages NaN", dict(advantages=_nan_at(torch.randn(B, T))), {}, ValueError, "advantages"),
    ("advantages per-seq Inf", dict(advantages=_nan_at(torch.randn(B), math.inf)), {}, ValueError, "advantages"),
    ("old_logprobs NaN", dict(old_logprobs=_nan_at(torch.randn(B, T), index=3)), {}, ValueError, "old_logprobs"),
    ("old_logprobs -Inf", dict(old_logprobs=_nan_at(torch.randn(B, T), -math.inf)), {}, ValueError, "old_logprobs"),
    ("ref_logprobs NaN", {}, dict(ref_logprobs=_nan_at(torch.randn(B, T)), kl_coef=0.1), ValueError, "ref_logprobs"),
    ("rollout_logprobs Inf", {}, dict(rollout_logprobs=_nan_at(torch.randn(B, T), math.inf), tis_cap=2.0),
     ValueError, "rollout_logprobs"),
    ("bias NaN", {}, dict(bias=_nan_at(torch.zeros(V))), ValueError, "bias"),
    ("bias +Inf", {}, dict(bias=_nan_at(torch.zeros(V), math.inf)), ValueError, "bias"),
    ("bias all -Inf", {}, dict(bias=torch.full((V,), -math.inf)), ValueError, "bias"),
    ("target id = V", dict(targets=_nan_at(torch.zeros(B, T, dtype=torch.long), V)), {}, ValueError, "targets"),
    ("target id negative", dict(targets=_nan_at(torch.zeros(B, T, dtype=torch.long), -1)), {}, ValueError, "targets"),
    ("target id huge", dict(targets=_nan_at(torch.zeros(B, T, dtype=torch.long), 2**40)), {}, ValueError, "targets"),
    ("target excluded by -inf bias", dict(targets=torch.zeros(B, T, dtype=torch.long)),
     dict(bias=_nan_at(torch.zeros(V), -math.inf)), ValueError, "targets"),
    ("mask value 2", dict(mask=_nan_at(torch.ones(B, T, dtype=torch.long), 2)), {}, ValueError, "mask"),
    ("mask value 0.5", dict(mask=_nan_at(torch.ones(B, T), 0.5)), {}, ValueError, "mask"),
    ("mask value -1", dict(mask=_nan_at(torch.ones(B, T, dtype=torch.int8), -1)), {}, ValueError, "mask"),
    # --- hyper-parameters ------------------------------------------------------------------------
    ("eps_low negative", {}, dict(eps_low=-0.1), ValueError, "eps_low"),
    ("eps_low 1", {}, dict(eps_low=1.0), ValueError, "eps_low"),
    ("eps_low NaN", {}, dict(eps_low=math.nan), ValueError, "eps_low"),
    ("eps_high negative", {}, dict(eps_high=-0.01), ValueError, "eps_high"),
    ("eps_high Inf", {}, dict(eps_high=math.inf), ValueError, "eps_high"),
    ("dual_clip 1", {}, dict(dual_clip=1.0), ValueError, "dual_clip"),
    ("dual_clip 0.5", {}, dict(dual_clip=0.5), ValueError, "dual_clip"),
    ("delta 1", {}, dict(delta=1.0), ValueError, "delta"),
    ("delta 0.9", {}, dict(delta=0.9), ValueError, "delta"),
    ("repo unknown", {}, dict(repo="entropy"), ValueError, "repo"),
    ("decorrelate coef > 1", {}, dict(repo="decorrelate", repo_coef=1.5), ValueError, "repo_coef"),
    ("decorrelate coef < 0", {}, dict(repo="decorrelate", repo_coef=-0.1), ValueError, "repo_coef"),
    ("fixed coef < 0", {}, dict(repo="fixed", repo_coef=-1.0), ValueError, "repo_coef"),
    ("fixed coef NaN", {}, dict(repo="fixed", repo_coef=math.nan), ValueError, "repo_coef"),
    ("kl_coef negative", {}, dict(kl_coef=-0.1), ValueError, "kl_coef"),
    ("kl_estimator unknown", {}, dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    ("entropy_coef Inf", {}, dict(entropy_coef=math.inf), ValueError, "entropy_coef"),
    ("aggregation unknown", {}, dict(aggregation="sum"), ValueError, "aggregation"),
    ("importance_level unknown", {}, dict(importance_level="seq"), ValueError, "importance_level"),
    ("tis_level unknown", {}, dict(tis_level="batch"), ValueError, "tis_level"),
    ("temperature 0", {}, dict(temperature=0.0), ValueError, "temperature"),
    ("temperature negative", {}, dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature NaN", {}, dict(temperature=math.nan), ValueError, "temperature"),
    ("softcap 0", {}, dict(softcap=0.0), ValueError, "softcap"),
    ("softcap negative", {}, dict(softcap=-30.0), ValueError, "softcap"),
    ("tis_cap without rollout_logprobs", {}, dict(tis_cap=2.0), ValueError, "rollout_logprobs"),
    ("tis_cap 0", {}, dict(tis_cap=0.0, rollout_logprobs=torch.zeros(B, T)), ValueError, "tis_cap"),
    ("kl_coef without ref_logprobs", {}, dict(kl_coef=0.1, ref_logprobs=None), ValueError, "ref_logprobs"),
    ("max_length with token-mean", {}, dict(max_length=T), ValueError, "max_length"),
    ("max_length 0", {}, dict(max_length=0, aggregation="seq-mean-token-sum-norm"), ValueError, "max_length"),
    ("num_items_in_batch 0", {}, dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("num_items_in_batch NaN", {}, dict(num_items_in_batch=math.nan), ValueError, "num_items_in_batch"),
    ("num_items_in_batch tensor 0", {}, dict(num_items_in_batch=torch.tensor(0.0)), ValueError, "num_items_in_batch"),
    ("num_items_in_batch 2 elements", {}, dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    ("backend unknown", {}, dict(backend="cuda"), ValueError, "backend"),
    ("precision unknown", {}, dict(precision="fp8"), ValueError, "precision"),
    ("token_chunk 0", {}, dict(token_chunk=0), ValueError, "token_chunk"),
    ("vocab_chunk negative", {}, dict(vocab_chunk=-4), ValueError, "vocab_chunk"),
    ("vocab_chunk float", {}, dict(vocab_chunk=8.0), ValueError, "vocab_chunk"),
    ("cu_seqlens with [B, T, D] hidden", {}, dict(cu_seqlens=torch.tensor([0, T, 2 * T])), ValueError, "cu_seqlens"),
]


@pytest.mark.parametrize("change,kw_change,error,match", [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])
def test_repo_loss_bad_argument(change, kw_change, error, match):
    args, kwargs = _valid()
    args.update(change)
    kwargs.update(kw_change)
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("mask",)}
    with pytest.raises(error, match=match):
        _call(args, kwargs)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in TF32_BACKENDS])
def test_precision_tf32_needs_triton(backend):
    args, kwargs = _valid()
    with pytest.raises(ValueError, match="precision"):
        _call(args, {**kwargs, "precision": "tf32", "backend": backend})
    with pytest.raises(ValueError, match="precision"):
        fused_logprobs_entropy(args["hidden"], args["weight"], args["targets"], precision="tf32", backend=backend)


def test_triton_backend_rejects_fp64():
    """Checked before any kernel is imported: the message names the dtype and the way out."""
    args, kwargs = _valid()
    h = args["hidden"].double()
    with pytest.raises(TypeError, match="float64"):
        fused_logprobs_entropy(h, args["weight"].double(), args["targets"], backend="triton")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, kwargs = _valid()
    with pytest.raises(ValueError, match="backend"):
        fused_logprobs_entropy(args["hidden"], args["weight"], args["targets"], backend="triton")


# --- packed inputs -------------------------------------------------------------------------------

PACKED_CASES = [
    ("seq-mean-token-mean without cu_seqlens", dict(aggregation="seq-mean-token-mean")),
    ("seq-mean-token-sum without cu_seqlens", dict(aggregation="seq-mean-token-sum")),
    ("seq-mean-token-sum-norm without cu_seqlens", dict(aggregation="seq-mean-token-sum-norm", max_length=5)),
    ("sequence ratio without cu_seqlens", dict(importance_level="sequence")),
    ("sequence TIS without cu_seqlens", dict(tis_cap=2.0, tis_level="sequence", rollout_logprobs=torch.zeros(B * T))),
]


@pytest.mark.parametrize("kw", [c[1] for c in PACKED_CASES], ids=[c[0] for c in PACKED_CASES])
def test_packed_sequence_options_need_cu_seqlens(kw):
    args, kwargs = _valid(packed=True)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call(args, {**kwargs, **kw})


def test_packed_per_sequence_advantages_need_cu_seqlens():
    args, kwargs = _valid(packed=True)
    args["advantages"] = torch.randn(B)
    with pytest.raises(ValueError, match="advantages"):
        _call(args, kwargs)


def test_packed_dr_grpo_needs_max_length():
    args, kwargs = _valid(packed=True)
    with pytest.raises(ValueError, match="max_length"):
        _call(args, {**kwargs, "aggregation": "seq-mean-token-sum-norm", "cu_seqlens": torch.tensor([0, 3, B * T])})


CU_CASES = [
    ("not starting at 0", torch.tensor([1, 4, B * T])),
    ("not ending at N", torch.tensor([0, 4, B * T - 1])),
    ("past N", torch.tensor([0, 4, B * T + 1])),
    ("decreasing", torch.tensor([0, 6, 3, B * T])),
    ("single offset", torch.tensor([0])),
    ("2-D", torch.tensor([[0, B * T]])),
    ("float", torch.tensor([0.0, float(B * T)])),
]


@pytest.mark.parametrize("cu", [c[1] for c in CU_CASES], ids=[c[0] for c in CU_CASES])
def test_bad_cu_seqlens(cu):
    args, kwargs = _valid(packed=True)
    with pytest.raises((ValueError, TypeError), match="cu_seqlens"):
        _call(args, {**kwargs, "cu_seqlens": cu, "aggregation": "seq-mean-token-mean"})


def test_bad_cu_seqlens_error_types():
    args, kwargs = _valid(packed=True)
    with pytest.raises(TypeError, match="cu_seqlens"):
        _call(args, {**kwargs, "cu_seqlens": torch.tensor([0.0, float(B * T)])})
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call(args, {**kwargs, "cu_seqlens": torch.tensor([0, 6, 3, B * T])})


# --- fused_logprobs_entropy --------------------------------------------------------------------------

HEAD_CASES = [
    ("hidden int", dict(hidden=torch.ones(4, D, dtype=torch.int64)), TypeError, "hidden"),
    ("weight shape", dict(weight=torch.randn(V, D + 2)), ValueError, "weight"),
    ("targets float", dict(targets=torch.zeros(4)), TypeError, "targets"),
    ("targets shape", dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets"),
    ("target out of range", dict(targets=torch.tensor([0, 1, V, 2])), ValueError, "targets"),
    ("target excluded by -inf bias", dict(bias=_nan_at(torch.zeros(V), -math.inf)), ValueError, "targets"),
    ("hidden NaN", dict(hidden=_nan_at(torch.randn(4, D))), ValueError, "hidden"),
    ("weight Inf", dict(weight=_nan_at(torch.randn(V, D), math.inf)), ValueError, "weight"),
    ("bias NaN", dict(bias=_nan_at(torch.zeros(V))), ValueError, "bias"),
    ("bias all -inf", dict(bias=torch.full((V,), -math.inf)), ValueError, "bias"),
    ("temperature 0", dict(temperature=0), ValueError, "temperature"),
    ("softcap -1", dict(softcap=-1.0), ValueError, "softcap"),
    ("backend unknown", dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("change,error,match", [c[1:] for c in HEAD_CASES], ids=[c[0] for c in HEAD_CASES])
def test_fused_logprobs_entropy_bad_argument(change, error, match):
    args = dict(hidden=torch.randn(4, D), weight=torch.randn(V, D), targets=torch.tensor([0, 1, 2, 3]))
    args.update(change)
    with pytest.raises(error, match=match):
        fused_logprobs_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_validate_false_skips_value_checks_only():
    """validate=False skips value checks (NaN, ids) but never shape/dtype/hyper-parameter ones."""
    args, kwargs = _valid()
    with pytest.raises(ValueError, match="eps_low"):
        _call(args, {**kwargs, "validate": False, "eps_low": 2.0})
    with pytest.raises(TypeError, match="targets"):
        _call({**args, "targets": args["targets"].float()}, {**kwargs, "validate": False})
    out = _call({**args, "advantages": _nan_at(args["advantages"])}, {**kwargs, "validate": False})
    assert out.loss is not None  # no check ran; the NaN is the caller's business


def test_masked_positions_may_hold_anything():
    """NaN / Inf per-token values where mask == 0 or target == ignore_index are not errors."""
    args, kwargs = _valid()
    mask = args["mask"].clone()
    mask[0, :2] = False
    targets = args["targets"].clone()
    targets[1, 3] = -100
    bad = ~mask.clone()
    bad[1, 3] = True
    dirty = lambda x: torch.where(bad, math.nan, x)  # noqa: E731
    out = _call({**args, "mask": mask, "targets": targets, "advantages": dirty(args["advantages"]),
                 "old_logprobs": dirty(args["old_logprobs"])},
                {**kwargs, "ref_logprobs": dirty(kwargs["ref_logprobs"]), "kl_coef": 0.1, "tis_cap": 2.0,
                 "rollout_logprobs": dirty(torch.zeros(B, T))})
    assert torch.isfinite(out.loss)


# --- adapo_loss ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["eps_high", "eps_low"])
def test_adapo_loss_takes_eps_from_the_controller(name):
    args, kwargs = _valid()
    with pytest.raises(TypeError, match=name):
        _call(args, {**kwargs, "controller": AdaptiveClip(target_entropy=1.0), name: 0.3}, fn=adapo_loss)


def test_adapo_loss_needs_an_adaptive_clip():
    args, kwargs = _valid()
    with pytest.raises(TypeError, match="controller"):
        _call(args, {**kwargs, "controller": fused_pg.AdaptiveRepoCoef(target_entropy=1.0)}, fn=adapo_loss)
    with pytest.raises(TypeError, match="controller"):
        _call(args, {**kwargs, "controller": {"eps_high": 0.3}}, fn=adapo_loss)


@pytest.mark.cuda
def test_device_mismatch_names_the_argument():
    args, kwargs = _valid()
    args = {k: v.cuda() for k, v in args.items()}
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    for name in ("weight", "targets", "advantages", "old_logprobs", "mask"):
        with pytest.raises(ValueError, match=name):
            _call({**args, name: args[name].cpu()}, kwargs)
    with pytest.raises(ValueError, match="bias"):
        _call(args, {**kwargs, "bias": kwargs["bias"].cpu()})
