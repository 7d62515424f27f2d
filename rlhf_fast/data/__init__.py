"""Data for the trainers: the embedded synthetic task and tokenizer, users' JSONL files, tokenization into packed
batches."""

from . import task
from .jsonl import DataError, read_jsonl, write_jsonl
from .rollouts import generation_rollouts, load_rollouts, save_rollouts
from .tokenize import IGNORE_INDEX, pair_batch, prompt_batch, sft_batch, warn_truncation

__all__ = ["task", "DataError", "read_jsonl", "write_jsonl", "IGNORE_INDEX", "sft_batch", "pair_batch",
           "prompt_batch", "warn_truncation", "generation_rollouts", "load_rollouts", "save_rollouts"]
