"""fused_pg.integrations.trl against stock TRL: two real ``GRPOTrainer`` steps on a tiny Qwen2
built from a config (D=64, 2 layers, V=1000; a WordLevel tokenizer; no download), stock vs fused
with TRL's own ``GRPOConfig`` (the import swap alone), for every TRL loss type fused-pg
expresses; the options TRL's loss reads, on identical inputs; what it refuses; fused-pg's options
as ``GRPOConfig`` fields (Python, YAML, the ``grpo`` command line); the ADAPO controller's
stepping and checkpointing; loud failure when a TRL internal changes.

Set-up that makes the comparison mean something: the model stops at ~1 token in 9 (a set of
end-of-sequence ids), so completions have different lengths and the normalisers differ between
loss types; ``num_iterations=2`` makes the second optimiser step off-policy (ratios != 1, clipping
active); plain SGD keeps the parameters of the two runs as close after step 1 as their
gradients (Adam's ``g / sqrt(v)`` magnifies rounding noise in near-zero gradients).

Pass rules (fp32; ``pytest -s`` prints the measured values, see ``test_agreement_summary``):
* losses, per micro-batch: ``|d| <= 1e-6 * (1 + |loss|)``;
* gradients, per optimiser step: ``||g_fused - g_stock|| / ||g_stock|| <= 1e-6`` over all
  parameters, and ``max|d| / max|g| <= 1e-5`` per parameter (gradient accumulation sums
  micro-batches whose contributions cancel, which magnifies fp32 rounding in single entries;
  on identical inputs ``test_loss_options_match_stock_on_identical_inputs`` holds each parameter
  to 1e-6).
* ``bf16=True`` (TRL's default) with ``cast_lm_head_to_fp32=True``: both heads in fp32 behind a
  bf16 backbone, the same rules. With TRL's default bf16 head, TRL rounds every logit tile to
  bf16 and fused-pg does not: the fused run must be at least as close to an fp32 run as stock
  TRL's (the fair rule).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

import pytest
import torch

trl = pytest.importorskip("trl", minversion="1.16",
                          reason="fused_pg.integrations.trl needs trl>=1.16: pip install 'fused-pg[trl]'")
transformers = pytest.importorskip("transformers", minversion="5.0")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import fused_pg  # noqa: E402
from fused_pg.integrations import _common  # noqa: E402
from fused_pg.integrations import trl as ftrl  # noqa: E402
from fused_pg.integrations.trl import CONTROLLER_FILE, GRPOTrainer  # noqa: E402

V, D = 1000, 64
LOSS_TYPES = [("grpo", "token"), ("grpo", "sequence"), ("bnpo", "token"), ("dr_grpo", "token"),
              ("dapo", "token"), ("luspo", "sequence")]
IDS = [f"{lt}-{lvl}" for lt, lvl in LOSS_TYPES]
AGREEMENT: dict[str, dict] = {}  # printed at the end of the module (pytest -s) for the record


# ---------------------------------------------------------------------------------------------
# the tiny model, tokenizer and prompts
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _save_model(path, **config) -> str:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1, **config)
    model = Qwen2ForCausalLM(cfg)
    # ~1 token in 9 ends a completion: completions of different lengths
    model.generation_config.eos_token_id = [1, *range(3, V, 9)]
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("qwen2-tiny"))


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": [" ".join(f"w{(7 * i + j) % 50}" for j in range(3 + i % 3))
                                         for i in range(8)]})


def reward(completions, **kwargs):
    return [float(len(c) % 7) for c in completions]


class GradRecorder(TrainerCallback):
    """The accumulated gradient of every parameter just before each optimiser step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def recording(base):
    """``base`` whose ``_compute_loss`` records each micro-batch's loss and inputs."""

    class Recording(base):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            self.recorded.append((loss.detach().double().clone(),
                                  {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}))
            self.entropies.append(self._metrics["train" if model.training else "eval"]["entropy"][-1])
            return loss

    return Recording


FUSED_FIELDS = set(ftrl.OPTION_KEYS) | set(ftrl.HEAD_OPTIONS)


def config(tmp_path, loss_type="dapo", level="token", **kw) -> GRPOConfig:
    """TRL's GRPOConfig; fused-pg's subclass when a fused-pg field is given."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                gradient_accumulation_steps=2, max_completion_length=8, max_steps=2, learning_rate=0.05,
                optim="sgd", num_iterations=2, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                save_strategy="no", seed=0, loss_type=loss_type, importance_sampling_level=level)
    base.update(kw)
    return (ftrl.GRPOConfig if FUSED_FIELDS & set(kw) else GRPOConfig)(**base)


def train(fused: bool, args: GRPOConfig, model_dir, tokenizer, dataset):
    recorder = GradRecorder()
    cls = recording(GRPOTrainer if fused else trl.GRPOTrainer)
    trainer = cls(model=model_dir, reward_funcs=reward, args=args, train_dataset=dataset,
                  processing_class=tokenizer, callbacks=[recorder])
    trainer.recorded, trainer.entropies = [], []
    trainer.train()
    return trainer, recorder.grads


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

def global_rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all parameters together."""
    num = math.sqrt(sum(float((a[n] - b[n]).norm()) ** 2 for n in b))
    return num / max(math.sqrt(sum(float(b[n].norm()) ** 2 for n in b)), 1e-300)


def worst_param_rel(a: dict, b: dict) -> tuple[float, str]:
    """max over parameters of max|a - b| / max|b|."""
    return max((float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), 1e-300), n) for n in b)


def compare_runs(name, stock, fused, *, loss_tol=1e-6, global_tol=1e-6, param_tol=1e-5):
    (tr_s, g_s), (tr_f, g_f) = stock, fused
    assert len(tr_s.recorded) == len(tr_f.recorded) == 4, "two optimiser steps of two micro-batches each"
    assert len(g_s) == len(g_f) == 2
    loss_err = 0.0
    for (ls, in_s), (lf, in_f) in zip(tr_s.recorded, tr_f.recorded):
        # the same generated batch in both runs (same seed, same model): a fair comparison
        assert torch.equal(in_s["completion_ids"], in_f["completion_ids"])
        assert torch.equal(in_s["completion_mask"], in_f["completion_mask"])
        # and the same behaviour log-probs (TRL's head and fused-pg's read the same hidden states):
        # if these differ, a later gradient mismatch comes from the old-log-prob pass, not the loss
        if in_s.get("old_per_token_logps") is not None:
            m = in_s["completion_mask"].bool()
            d_old = float((in_s["old_per_token_logps"] - in_f["old_per_token_logps"]).abs()[m].max())
            assert d_old <= 1e-5, f"{name}: behaviour log-probs differ by {d_old:.3e} between the runs"
        err = abs(float(lf) - float(ls))
        assert err <= loss_tol * (1 + abs(float(ls))), f"{name}: loss {float(lf)!r} vs stock {float(ls)!r}"
        loss_err = max(loss_err, err / (1 + abs(float(ls))))
    lengths = {int(x) for _, inp in tr_s.recorded for x in inp["completion_mask"].sum(1)}
    assert len(lengths) > 2, f"completions should differ in length, got {lengths}"
    rec = dict(loss=loss_err)
    for step, (a, b) in enumerate(zip(g_f, g_s)):
        assert set(a) == set(b)
        g = global_rel(a, b)
        p, which = worst_param_rel(a, b)
        rec[f"step{step + 1}"] = (g, p)
        assert g <= global_tol, f"{name} step {step + 1}: ||dg|| / ||g|| = {g:.3e}"
        assert p <= param_tol, f"{name} step {step + 1}: {which} max|dg| / max|g| = {p:.3e}"
    AGREEMENT[name] = rec
    return rec


_STOCK: dict = {}


def stock_run(key, args, model_dir, tokenizer, dataset):
    if key not in _STOCK:
        _STOCK[key] = train(False, args, model_dir, tokenizer, dataset)
    return _STOCK[key]


# ---------------------------------------------------------------------------------------------
# two real steps, stock vs fused
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,level", LOSS_TYPES, ids=IDS)
def test_two_steps_match_stock_trl_fp32(loss_type, level, tmp_path, model_dir, tokenizer, dataset):
    args = config(tmp_path, loss_type, level)
    stock = stock_run(("fp32", loss_type, level), args, model_dir, tokenizer, dataset)
    fused = train(True, args, model_dir, tokenizer, dataset)
    compare_runs(f"fp32 {loss_type}/{level}", stock, fused)
    # TRL's logged keys, with the same values, and fused-pg's own
    for rec_s, rec_f in zip(stock[0].state.log_history[:2], fused[0].state.log_history[:2]):
        for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                    "clip_ratio/low_min", "clip_ratio/high_max"):
            assert rec_f[key] == pytest.approx(rec_s[key], rel=1e-5, abs=1e-6), key
        assert {f"fused_pg/{k}" for k in fused_pg.METRIC_KEYS} <= set(rec_f)
    # the second step is off-policy and clips: the comparison covers the clipped surrogate
    assert any(r.get("clip_ratio/region_mean", 0) > 0 for r in stock[0].state.log_history)


@pytest.mark.parametrize("loss_type,level", LOSS_TYPES, ids=IDS)
def test_two_steps_match_stock_trl_bf16_fp32_head(loss_type, level, tmp_path, model_dir, tokenizer, dataset):
    """bf16=True (autocast backbone) with cast_lm_head_to_fp32=True: both heads read the bf16
    hidden states in fp32, so stock and fused agree as in fp32."""
    args = config(tmp_path, loss_type, level, bf16=True, cast_lm_head_to_fp32=True)
    stock = stock_run(("bf16-fp32head", loss_type, level), args, model_dir, tokenizer, dataset)
    fused = train(True, args, model_dir, tokenizer, dataset)
    compare_runs(f"bf16+fp32 head {loss_type}/{level}", stock, fused)


@pytest.mark.parametrize("loss_type,level", LOSS_TYPES, ids=IDS)
def test_two_steps_bf16_default_head_no_less_accurate(loss_type, level, tmp_path, model_dir, tokenizer, dataset):
    """bf16=True with TRL's default head: TRL rounds each logit tile to bf16, fused-pg accumulates
    the logits in fp32 from the bf16 activations and the fp32 master weight. Against an fp32 run
    (the better estimate of the truth), fused-pg's first-step gradients are no further off than
    stock TRL's (within 25%: the bf16 backbone's own rounding dominates both), nor its losses."""
    fp32 = stock_run(("fp32", loss_type, level), config(tmp_path, loss_type, level), model_dir, tokenizer, dataset)
    args = config(tmp_path, loss_type, level, bf16=True)
    stock = stock_run(("bf16", loss_type, level), args, model_dir, tokenizer, dataset)
    fused = train(True, args, model_dir, tokenizer, dataset)
    err_stock, err_fused = global_rel(stock[1][0], fp32[1][0]), global_rel(fused[1][0], fp32[1][0])
    assert err_fused <= 1.25 * err_stock, f"first step: fused {err_fused:.3e} vs stock {err_stock:.3e} from fp32"
    # the losses of the second, off-policy step (the first step's is the advantages' mean, ratio 1):
    # the repository's fair rule, error <= the plain implementation's + 1e-4 (1 + |loss|)
    loss_ref = [float(x) for x, _ in fp32[0].recorded[2:]]
    loss_stock = max(abs(float(x) - r) for (x, _), r in zip(stock[0].recorded[2:], loss_ref))
    loss_fused = max(abs(float(x) - r) for (x, _), r in zip(fused[0].recorded[2:], loss_ref))
    assert loss_fused <= loss_stock + 1e-4 * (1 + max(map(abs, loss_ref))), (loss_fused, loss_stock)
    g_sf = global_rel(fused[1][0], stock[1][0])
    AGREEMENT[f"bf16 default head {loss_type}/{level}"] = dict(
        fused_vs_stock_step1=g_sf, err_vs_fp32_stock=err_stock, err_vs_fp32_fused=err_fused,
        loss_err_vs_fp32_stock=loss_stock, loss_err_vs_fp32_fused=loss_fused)


def test_peft_lora_matches_stock_trl(tmp_path, model_dir, tokenizer, dataset):
    """With a PEFT adapter TRL patches the base model's forward and disables the adapter for the
    reference log-probs: the fused path runs through the PeftModel and matches stock TRL."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    args = config(tmp_path, "dapo", beta=0.04)
    runs = []
    for fused in (False, True):
        recorder = GradRecorder()
        cls = recording(GRPOTrainer if fused else trl.GRPOTrainer)
        trainer = cls(model=model_dir, reward_funcs=reward, args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[recorder],
                      peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        trainer.recorded, trainer.entropies = [], []
        trainer.train()
        runs.append((trainer, recorder.grads))
    assert type(runs[1][0].model).__name__.startswith("Peft")
    assert "fused_pg/n_tokens" in runs[1][0].state.log_history[0]
    rec = compare_runs("fp32 dapo with a LoRA adapter", *runs)
    assert all("lora" in n for n in runs[0][1][0])  # only the adapter trains
    assert rec["step2"][0] <= 1e-6


# ---------------------------------------------------------------------------------------------
# every option TRL's loss reads, on identical inputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captured(tmp_path_factory, model_dir, tokenizer, dataset):
    """A fused trainer after two steps with beta > 0 (reference log-probs), num_iterations=2 (old
    log-probs) and temperature 0.7; the inputs of its last micro-batch; and a stock trainer with
    the same configuration whose model holds the fused trainer's current weights."""
    args = config(tmp_path_factory.mktemp("captured"), "dapo", beta=0.04, temperature=0.7)
    fused, _ = train(True, args, model_dir, tokenizer, dataset)
    inputs = fused.recorded[-1][1]
    assert inputs.get("old_per_token_logps") is not None and inputs.get("ref_per_token_logps") is not None
    stock = trl.GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=dataset,
                            processing_class=tokenizer)
    stock.model.load_state_dict(fused.model.state_dict())
    stock.model.train()
    stock.current_gradient_accumulation_steps = fused.current_gradient_accumulation_steps  # set by train()
    return fused, stock, inputs


def _grads(trainer, fn, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = fn(model, inputs)
    loss.backward()
    return loss.detach().double(), {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                                    if p.grad is not None}


VARIANTS = {
    "dapo": dict(),
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", use_bias_correction_kl=False),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", use_bias_correction_kl=False),
    "kl-bias-corrected": dict(use_bias_correction_kl=True),
    "kl-plain": dict(use_bias_correction_kl=False),
    "no-kl": dict(beta=0.0),
    "delta": dict(delta=1.05),
    "entropy-bonus": dict(entropy_coef=0.05),
    "entropy-bonus-grpo": dict(entropy_coef=-0.03, loss_type="grpo"),
    "off-policy-mask": dict(off_policy_mask_threshold=0.0),
    "vllm-is-token": dict(use_vllm=True, is_ratio="token"),
    "vllm-is-sequence": dict(use_vllm=True, is_ratio="sequence"),
    "tool-mask": dict(tool_mask=True),
    "eval-mode": dict(eval=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_options_match_stock_on_identical_inputs(variant, captured):
    """Stock TRL (its head, its ``_compute_loss``) and fused-pg on the same weights and micro-batch,
    for each option TRL's loss reads: loss within 1e-6, every parameter's gradient within 1e-6
    (max|d| / max|g|)."""
    fused, stock, base_inputs = captured
    opts = dict(VARIANTS[variant])
    inputs = dict(base_inputs)
    g = torch.Generator().manual_seed(1)
    mask = inputs["completion_mask"]
    attrs = ("loss_type", "importance_sampling_level", "beta", "entropy_coef", "_entropy_bonus_enabled",
             "off_policy_mask_threshold", "use_vllm", "vllm_importance_sampling_correction")
    saved = [({k: getattr(t, k) for k in attrs}, {k: getattr(t.args, k) for k in ("delta", "use_bias_correction_kl")})
             for t in (fused, stock)]
    if opts.get("use_vllm"):
        shape = mask.shape if opts["is_ratio"] == "token" else (mask.size(0), 1)
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(shape, generator=g)
    if opts.get("tool_mask"):
        inputs["tool_mask"] = (torch.rand(mask.shape, generator=g) > 0.3).long()
    if opts.get("off_policy_mask_threshold") is not None:
        # every other sequence far from the sampler, some of them with negative advantages
        inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] - \
            torch.arange(mask.size(0))[:, None].remainder(2) * 0.5
    results = []
    try:
        for t in (stock, fused):
            for k in ("loss_type", "importance_sampling_level", "beta", "off_policy_mask_threshold"):
                if k in opts:
                    setattr(t, k, opts[k])
            for k in ("delta", "use_bias_correction_kl"):
                if k in opts:
                    setattr(t.args, k, opts[k])
            if "entropy_coef" in opts:
                t.entropy_coef, t._entropy_bonus_enabled = opts["entropy_coef"], True
            if opts.get("use_vllm"):
                t.use_vllm, t.vllm_importance_sampling_correction = True, True
            if opts.get("eval"):
                t.model.eval()
            fn = (lambda m, i, t=t: trl.GRPOTrainer._compute_loss(t, m, i)) if t is stock else t._compute_loss
            results.append(_grads(t, fn, inputs))
    finally:
        for t, (a, b) in zip((fused, stock), saved):
            for k, v in a.items():
                setattr(t, k, v)
            for k, v in b.items():
                setattr(t.args, k, v)
            t.model.train()
    (loss_s, g_s), (loss_f, g_f) = results
    assert abs(float(loss_f - loss_s)) <= 1e-6 * (1 + abs(float(loss_s))), (float(loss_f), float(loss_s))
    p, which = worst_param_rel(g_f, g_s)
    gl = global_rel(g_f, g_s)
    AGREEMENT[f"identical inputs: {variant}"] = dict(loss=abs(float(loss_f - loss_s)), global_rel=gl, param_rel=p)
    assert gl <= 1e-6 and p <= 1e-6, f"{variant}: {which} max|dg|/max|g| {p:.3e}, global {gl:.3e}"


# ---------------------------------------------------------------------------------------------
# refusals, by name
# ---------------------------------------------------------------------------------------------

REFUSED = {
    "cispo": (dict(loss_type="cispo"), "loss_type='cispo'"),
    "sapo": (dict(loss_type="sapo"), "loss_type='sapo'"),
    "vespo": (dict(loss_type="vespo"), "loss_type='vespo'"),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    "use_adaptive_entropy": (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    "bias-corrected KL at sequence level": (dict(beta=0.1, importance_sampling_level="sequence",
                                                 use_bias_correction_kl=True), "use_bias_correction_kl"),
}


@pytest.mark.parametrize("option", list(REFUSED))
def test_unsupported_trl_options_are_refused_by_name(option, tmp_path, model_dir, tokenizer, dataset):
    kw, name = REFUSED[option]
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        GRPOTrainer(model=model_dir, reward_funcs=reward, args=config(tmp_path, **kw), train_dataset=dataset,
                    processing_class=tokenizer)


def test_softcap_with_temperature_is_refused(tmp_path, tokenizer, dataset):
    """TRL soft-caps the logits before dividing by the temperature, fused-pg after."""
    path = _save_model(tmp_path / "capped", final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        GRPOTrainer(model=path, reward_funcs=reward, args=config(tmp_path, temperature=0.7), train_dataset=dataset,
                    processing_class=tokenizer)


BAD_FIELDS = [
    (dict(repo="decorelate"), "GRPOConfig.repo"),
    (dict(repo="decorrelate", repo_coef=2.0), "GRPOConfig.repo_coef"),
    (dict(repo_center="yes"), "GRPOConfig.repo_center"),
    (dict(backend="cuda"), "GRPOConfig.backend"),
    (dict(token_chunk=0), "GRPOConfig.token_chunk"),
    (dict(validate="no"), "GRPOConfig.validate"),
    (dict(adapo_target_entropy=1.0, adapo_rate=-1.0), "GRPOConfig.adapo_rate"),
    (dict(adapo_rate=0.1), "GRPOConfig.adapo_rate"),
    (dict(repo="none", delta=1.0), "GRPOConfig.delta"),
    (dict(repo="none", epsilon=1.0), "GRPOConfig.epsilon"),
    (dict(repo="none", loss_type="cispo"), "loss_type"),
]


@pytest.mark.parametrize("fields,named", BAD_FIELDS, ids=[n for _, n in BAD_FIELDS])
def test_bad_options_fail_when_the_config_is_built(fields, named, tmp_path):
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        config(tmp_path, **fields)


def test_grpo_config_values_fused_pg_refuses_fail_before_training(tmp_path, model_dir, tokenizer, dataset):
    """TRL's own GRPOConfig accepts delta=1.0 and epsilon=1.0; the fused trainer refuses them when
    it is built, naming TRL's field, before any rollout."""
    for kw, named in ((dict(delta=1.0), "GRPOConfig.delta"), (dict(epsilon=1.0), "GRPOConfig.epsilon")):
        with pytest.raises(ValueError, match=re.escape(named)):
            GRPOTrainer(model=model_dir, reward_funcs=reward, args=config(tmp_path, **kw), train_dataset=dataset,
                        processing_class=tokenizer)


def test_fields_are_documented_by_the_library():
    """Each fused-pg field's help is the documentation of the library option of the same name."""
    fields = {f.name: f for f in dataclasses.fields(ftrl.GRPOConfig)}
    for name in ("repo_coef", "repo_center"):
        assert fused_pg.LossConfig.__dataclass_fields__[name].metadata["doc"] in fields[name].metadata["help"]
    for name in ftrl.HEAD_OPTIONS:
        assert fused_pg.HeadConfig.__dataclass_fields__[name].metadata["doc"] in fields[name].metadata["help"]
        assert fields[name].default == fused_pg.HeadConfig.__dataclass_fields__[name].default
    assert fields["repo"].default == "none"  # stock TRL unless asked


# ---------------------------------------------------------------------------------------------
# REPO and ADAPO through the trainer; YAML and the command line
# ---------------------------------------------------------------------------------------------

def test_repo_metrics_are_logged(tmp_path, model_dir, tokenizer, dataset):
    """With REPO "decorrelate" (gamma = 1) each micro-batch's corrected advantages have no covariance
    with the log-probs; the trainer logs zeta and both covariances."""
    trainer, _ = train(True, config(tmp_path, max_steps=1, repo="decorrelate"), model_dir, tokenizer, dataset)
    logs = trainer.state.log_history[0]
    assert logs["fused_pg/repo_zeta"] != 0.0
    assert abs(logs["fused_pg/adv_logp_cov_after"]) <= 1e-6 * (1 + abs(logs["fused_pg/adv_logp_cov_before"]))
    assert logs["fused_pg/adv_logp_cov_before"] != 0.0


def test_import_swap_alone_is_stock(tmp_path, model_dir, tokenizer, dataset):
    """TRL's GRPOConfig with the fused trainer: REPO off, no controller (zeta 0, TRL's clip range)."""
    trainer, _ = train(True, config(tmp_path, max_steps=1), model_dir, tokenizer, dataset)
    logs = trainer.state.log_history[0]
    assert logs["fused_pg/repo_zeta"] == 0.0 and logs["fused_pg/eps_high"] == pytest.approx(0.2)
    assert trainer.fused_pg_controller is None


def test_repo_r_with_the_per_state_centre_and_the_repo_controller(tmp_path, model_dir, tokenizer, dataset):
    """REPO-R (zeta of either sign) centred per state (L = logp + H from fused-pg's head) with the
    multiplicative REPO controller: the first step used zeta = -0.3; below the target, a negative
    zeta halves at each optimiser step; the entropy monitor's metrics are logged."""
    args = config(tmp_path, max_steps=2, repo="relative", repo_center="state", repo_coef=-0.3,
                  repo_control_target_entropy=9.0, repo_control_mode="multiplicative")
    trainer, _ = train(True, args, model_dir, tokenizer, dataset)
    logs = [r for r in trainer.state.log_history if "fused_pg/repo_zeta" in r]
    assert logs[0]["fused_pg/repo_zeta"] == pytest.approx(-0.3)
    assert logs[1]["fused_pg/repo_zeta"] == pytest.approx(-0.15)
    assert isinstance(trainer.fused_pg_controller, fused_pg.AdaptiveRepoCoef)
    assert trainer.fused_pg_controller.repo_coef == pytest.approx(-0.075)
    for key in ("entropy_drive", "entropy_drive_pos", "entropy_drive_neg", "clip_high_p_mean", "clip_low_p_mean",
                "clip_high_below_avg", "clip_low_below_avg", "rollout_mismatch_abs_mean",
                "rollout_phantom_clip_frac"):
        assert f"fused_pg/{key}" in logs[0], key
    assert logs[0]["fused_pg/entropy_measured"] == 1.0 and math.isfinite(logs[0]["fused_pg/entropy_drive"])


SPLIT_MODES = {
    "fixed": dict(repo="fixed", repo_coef=0.5),
    "decorrelate": dict(repo="decorrelate"),
    "decorrelate-state": dict(repo="decorrelate", repo_center="state"),
    "relative": dict(repo="relative", repo_coef=0.5),
}


def first_step_grads(tmp_path, model_dir, tokenizer, dataset, micro, loss_type, **options):
    """The first optimiser step over 8 completions (two prompts' groups of 4), in micro-batches
    of ``micro`` rows (8 // micro gradient accumulation steps; the same generation batch)."""
    args = config(tmp_path / f"{micro}", loss_type, max_steps=1, per_device_train_batch_size=micro,
                  gradient_accumulation_steps=8 // micro, num_iterations=1, **options)
    return train(True, args, model_dir, tokenizer, dataset)[1][0]


@pytest.mark.parametrize("loss_type,repo", [("dapo", m) for m in SPLIT_MODES] + [("grpo", "decorrelate")])
def test_repo_gradient_does_not_depend_on_the_micro_batching(loss_type, repo, tmp_path, model_dir, tokenizer,
                                                            dataset):
    """One optimiser step in 1, 2 and 4 micro-batches: the same gradient (1e-6 relative): REPO's
    statistics are the whole step's, from a no-grad pass at its first micro-batch."""
    grads = [first_step_grads(tmp_path, model_dir, tokenizer, dataset, micro, loss_type, **SPLIT_MODES[repo])
             for micro in (8, 4, 2)]
    for micro, g in zip((4, 2), grads[1:]):
        assert global_rel(g, grads[0]) <= 1e-6, f"{repo}: micro-batches of {micro} move the gradient by " \
                                                 f"{global_rel(g, grads[0]):.2e}"
    off = first_step_grads(tmp_path / "off", model_dir, tokenizer, dataset, 8, loss_type, repo="none")
    assert global_rel(grads[0], off) > 1e-3  # REPO acted


ADAPO = dict(epsilon_high=0.28, adapo_target_entropy=9.0, adapo_rate=0.01)


def test_adapo_controller_steps_once_per_optimizer_step_and_is_checkpointed(tmp_path, model_dir, tokenizer, dataset):
    args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, **ADAPO)
    trainer, _ = train(True, args, model_dir, tokenizer, dataset)
    ctrl = trainer.fused_pg_controller
    assert ctrl.steps == 2  # two optimiser steps of two micro-batches each
    # it saw the token-weighted mean entropy of each whole accumulation window
    tokens = [float(inp["completion_mask"].sum()) for _, inp in trainer.recorded]
    window = [(trainer.entropies[i] * tokens[i] + trainer.entropies[i + 1] * tokens[i + 1])
              / (tokens[i] + tokens[i + 1]) for i in (0, 2)]
    assert ctrl.entropy_ema == pytest.approx(window[1], rel=1e-6)
    # entropy below the target: eps_high rose by rate * (target - H) at each step ...
    after_first = 0.28 + 0.01 * (9.0 - window[0])
    assert ctrl.eps_high == pytest.approx(after_first + 0.01 * (9.0 - window[1]), rel=1e-6)
    # ... and the second step's loss used the value the first step left
    logged = [r for r in trainer.state.log_history if "fused_pg/eps_high" in r]
    assert logged[0]["fused_pg/eps_high"] == pytest.approx(0.28)
    assert logged[1]["fused_pg/eps_high"] == pytest.approx(after_first, rel=1e-6)
    state = json.load(open(os.path.join(str(tmp_path), "checkpoint-2", CONTROLLER_FILE)))
    assert state == json.loads(json.dumps(ctrl.state_dict()))
    first = json.load(open(os.path.join(str(tmp_path), "checkpoint-1", CONTROLLER_FILE)))
    assert first["steps"] == 1 and first["value"] < state["value"]

    def resume(**kw):
        resumed = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config(tmp_path, max_steps=1, **ADAPO, **kw),
                              train_dataset=dataset, processing_class=tokenizer)
        resumed.create_optimizer_and_scheduler(num_training_steps=1)
        resumed._load_optimizer_and_scheduler(os.path.join(str(tmp_path), "checkpoint-1"))
        return resumed.fused_pg_controller

    assert resume().state_dict() == first  # resuming restores the controller from the checkpoint
    # a checkpoint without the controller's state (e.g. written by stock TRL) is refused ...
    os.remove(os.path.join(str(tmp_path), "checkpoint-1", CONTROLLER_FILE))
    with pytest.raises(ValueError, match="controller_fresh_start"):
        resume()
    assert resume(controller_fresh_start=True).steps == 0  # ... unless restarting it is asked for


def test_a_resumed_run_continues_the_controllers_trajectory(tmp_path, model_dir, tokenizer, dataset):
    """Two optimiser steps in one run, and the same run resumed from its first checkpoint through
    ``train(resume_from_checkpoint=...)``: the controller ends in the same state, exactly. (One
    iteration per generation: TRL does not checkpoint a generation batch it would reuse.)"""
    args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, num_iterations=1, **ADAPO)
    full, _ = train(True, args, model_dir, tokenizer, dataset)
    resumed = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config(tmp_path / "resumed", max_steps=2,
                                                                             save_strategy="no", num_iterations=1,
                                                                             **ADAPO),
                          train_dataset=dataset, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=os.path.join(str(tmp_path), "checkpoint-1"))
    assert resumed.fused_pg_controller.steps == 2
    assert resumed.fused_pg_controller.state_dict() == full.fused_pg_controller.state_dict()


YAML = """
output_dir: {out}
loss_type: dapo
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 8
max_steps: 1
report_to: []
use_cpu: true
bf16: false
save_strategy: "no"
epsilon_high: 0.28
repo: decorrelate
repo_coef: 0.5
backend: torch
adapo_target_entropy: 9.0
adapo_rate: 0.01
adapo_bounds: [0.1, 0.6]
"""


def test_options_from_a_yaml_file_reach_the_loss(tmp_path, model_dir, tokenizer, dataset):
    from trl import TrlParser

    path = tmp_path / "grpo.yaml"
    path.write_text(YAML.format(out=tmp_path / "out"))
    (args,) = TrlParser((ftrl.GRPOConfig,)).parse_yaml_file(str(path))
    assert args.repo == "decorrelate" and args.adapo_bounds == [0.1, 0.6]
    trainer, _ = train(True, args, model_dir, tokenizer, dataset)
    logs = trainer.state.log_history[0]
    assert logs["fused_pg/repo_zeta"] != 0.0 and logs["fused_pg/eps_high"] == pytest.approx(0.28)
    assert trainer.fused_pg_controller.steps == 1 and trainer.fused_pg_controller.bounds == (0.1, 0.6)
    assert trainer._fused_pg_config().repo_coef == 0.5 and trainer._fused_pg_head.backend == "torch"


def test_the_grpo_command_line_trains_with_fused_pgs_options(tmp_path, monkeypatch, tokenizer):
    """``python -m fused_pg.integrations.trl grpo --config FILE``: TRL's grpo script (its dataset
    loading, reward functions by import path, model arguments) with this trainer and config."""
    model = _save_model(tmp_path / "model")
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n"
                                              for i in range(8)))
    (tmp_path / "rewards_for_cli.py").write_text(
        "def reward(completions, **kw):\n    return [float(len(c) % 7) for c in completions]\n")
    path = tmp_path / "grpo.yaml"
    path.write_text(YAML.format(out=tmp_path / "out") + f"model_name_or_path: {model}\ndataset_name: {data}\n"
                    "reward_funcs: [rewards_for_cli.reward]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    seen = []
    real = ftrl.GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append(self)
        return real(self, model, inputs)

    monkeypatch.setattr(ftrl.GRPOTrainer, "_compute_loss", spy)
    # the toy WordLevel tokenizer reloads from a Qwen2 folder as a Qwen2Tokenizer (which ignores its
    # vocabulary): hand TRL the fixture's tokenizer where it loads the processing class
    import trl.trainer.grpo_trainer as grpo_module

    monkeypatch.setattr(grpo_module.AutoProcessor, "from_pretrained", lambda *a, **k: tokenizer)
    ftrl.main(["grpo", "--config", str(path), "--repo_coef", "0.7"])
    trainer = seen[0]
    assert isinstance(trainer, GRPOTrainer) and trainer._fused_pg_config().repo_coef == 0.7  # flags win
    assert trainer.fused_pg_controller.steps == 1
    assert trl.GRPOTrainer is not GRPOTrainer  # the stock class is back


# ---------------------------------------------------------------------------------------------
# loud failure when TRL changes
# ---------------------------------------------------------------------------------------------

RENAMES = ["_compute_loss", "compute_loss", "_get_per_token_logps_and_entropies", "_prepare_inputs",
           "_save_checkpoint", "_load_optimizer_and_scheduler"]


@pytest.mark.parametrize("internal", RENAMES)
def test_a_renamed_trl_internal_fails_at_construction(internal, monkeypatch, tmp_path, model_dir, tokenizer, dataset):
    for owner in [c for c in trl.GRPOTrainer.__mro__ if internal in vars(c)]:  # renamed in TRL and its bases
        monkeypatch.delattr(owner, internal)
    with pytest.raises(_common.TrainerChanged, match=rf"trl {re.escape(trl.__version__)}.*{internal}"):
        GRPOTrainer(model=model_dir, reward_funcs=reward, args=config(tmp_path), train_dataset=dataset,
                    processing_class=tokenizer)


def test_a_trl_that_stops_calling_the_loss_hook_fails_at_its_first_step(monkeypatch, tmp_path, model_dir,
                                                                       tokenizer, dataset):
    """Construction passed (the internals were there); TRL then trains without the hook: the first
    optimiser step raises instead of training with TRL's stock loss."""
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config(tmp_path, max_steps=1),
                          train_dataset=dataset, processing_class=tokenizer)
    monkeypatch.setattr(trl.GRPOTrainer, "compute_loss",
                        lambda self, model, inputs, return_outputs=False, num_items_in_batch=None:
                        trl.GRPOTrainer._compute_loss(self, model, inputs))
    with pytest.raises(_common.TrainerChanged, match="without calling GRPOTrainer._compute_loss"):
        trainer.train()


def test_an_untested_trl_version_is_refused(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "1.17.0" if p == "trl" else real(p))
    with pytest.raises(ImportError, match=r"trl>=1.16,<1.17.*found trl 1.17.0"):
        _common.require("trl", package="trl", minimum="1.16", below="1.17", extra="trl")


def test_agreement_summary():
    """Prints the measured agreement (``pytest -s``); passes when the comparisons above ran."""
    for name, rec in sorted(AGREEMENT.items()):
        print(f"{name:45s} " + " ".join(f"{k}={v if isinstance(v, tuple) else f'{v:.2e}'}" for k, v in rec.items()))
