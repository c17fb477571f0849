#!/usr/bin/env bash
# GRPO with fused-pg's REPO policy loss in verl (tested with verl 0.9.1; needs verl's GPU stack:
# vLLM for the rollout, FSDP for the actor). Copy it, set MODEL / DATA (the GSM8K parquet files
# that verl's examples/data_preprocess/gsm8k.py writes), run it. tests/test_integration_verl.py
# checks every key below against verl's own configuration and builds fused-pg's section.
#
# What fused-pg adds are the `policy_loss` lines: `_target_` makes verl build that section as
# fused_pg.integrations.verl.PolicyLossConfig (verl's class plus fused-pg's keys), which also
# registers the "repo" / "adapo" losses and the mini-batch hook in every worker; the `+` keys
# are fused-pg's options (see the module docstring of fused_pg.integrations.verl).
# For ADAPO: loss_mode=adapo and +actor_rollout_ref.actor.policy_loss.adapo_target_entropy=<nats>.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-$HOME/data/gsm8k}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=64 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.calculate_entropy=True \
    actor_rollout_ref.actor.policy_loss._target_=fused_pg.integrations.verl.PolicyLossConfig \
    actor_rollout_ref.actor.policy_loss.loss_mode=repo \
    +actor_rollout_ref.actor.policy_loss.repo=decorrelate \
    +actor_rollout_ref.actor.policy_loss.repo_coef=1.0 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
    trainer.n_gpus_per_node=1 \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.save_freq=10 \
    trainer.test_freq=-1 \
    trainer.logger='[console]' \
    trainer.project_name=fused_pg \
    trainer.experiment_name=grpo_repo \
    "$@"
