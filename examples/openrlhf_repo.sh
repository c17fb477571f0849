#!/usr/bin/env bash
# GRPO-style PPO (group_norm advantages) with fused-pg's REPO policy loss in OpenRLHF (tested with
# OpenRLHF 0.11.2; needs OpenRLHF's GPU stack: DeepSpeed for the actor, vLLM for the rollout).
# Copy it, set MODEL / DATA (a JSONL prompt dataset with a "prompt" field) / REWARD_URL, run it.
# tests/test_integration_openrlhf.py runs this command line through fused-pg's launcher and
# OpenRLHF's own argument parsing, up to the ray.init that starts the run.
#
# fused-pg's launcher takes the --fused_pg.* flags (checked first), then runs OpenRLHF's
# openrlhf.cli.train_ppo_ray with the rest; every Ray worker installs fused-pg's PolicyLoss
# (fused_pg.integrations.openrlhf.install). Without --fused_pg.* flags the loss is OpenRLHF's own.
# For ADAPO add: --fused_pg.adapo_target_entropy <nats> (its clip range starts at eps_clip_low_high).
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-$HOME/data/prompts.jsonl}
REWARD_URL=${REWARD_URL:-http://127.0.0.1:5000/get_reward}
CKPT=${CKPT:-./ckpt/openrlhf_repo}

python3 -m fused_pg.integrations.openrlhf --fused_pg.repo decorrelate --fused_pg.repo_coef 1.0 --actor.model_name_or_path "$MODEL" --data.prompt_dataset "$DATA" --data.input_key prompt --data.apply_chat_template --reward.remote_url "$REWARD_URL" --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 4 --rollout.batch_size 16 --rollout.micro_batch_size 4 --rollout.max_new_tokens 512 --train.batch_size 64 --train.micro_batch_size 4 --actor.eps_clip_low_high 0.2 0.28 --actor.num_nodes 1 --actor.num_gpus_per_node 1 --ref.num_nodes 1 --ref.num_gpus_per_node 1 --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5 --train.colocate_all --ckpt.path "$CKPT" --ckpt.save_steps 10 "$@"
