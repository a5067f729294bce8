"""Training adapters:

- `config`: what to train (`build_adapter_model`) and how (`TrainConfig`);
- `loop`: `train`, the loss and the validation loss;
- `checkpoint`: what a run writes (adapter directories, checkpoints) and how it resumes;
- `distributed`: ranks, collectives and the FSDP wrapping policy;
- `data`: instruction files and BIG-bench tasks, tokenised with label masking;
- `evaluation`: multiple-choice accuracy and generation with answer extraction;
- `optim`: AdamW over the adapter's parameter groups.
"""

from .checkpoint import STATE_FILE, latest_checkpoint, load_best, save_adapter_dir, save_on_main
from .config import PRECISIONS, SCHEDULES, TrainConfig, TrainResult, build_adapter_model
from .distributed import fsdp_auto_wrap_policy, unwrap
from .loop import batch_indices, evaluate_loss, lr_lambda, plot_loss_curve, token_loss_sum, train

__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "STATE_FILE",
    "TrainConfig",
    "TrainResult",
    "batch_indices",
    "build_adapter_model",
    "evaluate_loss",
    "fsdp_auto_wrap_policy",
    "latest_checkpoint",
    "load_best",
    "lr_lambda",
    "plot_loss_curve",
    "save_adapter_dir",
    "save_on_main",
    "token_loss_sum",
    "train",
    "unwrap",
]
