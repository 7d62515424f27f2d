"""Orchestration: readable SFT, reward-model, PPO/GRPO/RLOO and DPO trainers built on the public ops API."""

from .dpo import DPOConfig, train_dpo
from .pipeline import PipelineConfig, run_pipeline
from .ppo import PPOConfig, PPOTrainer, train_ppo
from .rm import RMConfig, train_rm
from .sft import SFTConfig, train_sft

__all__ = ["DPOConfig", "train_dpo", "PipelineConfig", "run_pipeline", "PPOConfig", "PPOTrainer", "train_ppo",
           "RMConfig", "train_rm", "SFTConfig", "train_sft"]
