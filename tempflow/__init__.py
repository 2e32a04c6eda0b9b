"""tempflow: online RL fine-tuning (TempFlow-GRPO, Flow-GRPO) of flow-matching text-to-image models."""

from .config import TempFlowGRPOConfig

__version__ = "0.1.0"


def __getattr__(name):
    # the trainer pulls in diffusers, accelerate and peft: import it only when asked for
    if name == "TempFlowGRPOTrainer":
        from .trainer import TempFlowGRPOTrainer

        return TempFlowGRPOTrainer
    raise AttributeError(f"module 'tempflow' has no attribute {name!r}")


__all__ = ["TempFlowGRPOConfig", "TempFlowGRPOTrainer", "__version__"]
