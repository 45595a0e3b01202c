"""lmadapt: adapt pretrained language models to your task (fine-tuning, PEFT, prompting)."""

from lmadapt.api import evaluate, load_run, predict, train
from lmadapt.config import RunConfig, load_config
from lmadapt.errors import ConfigError, DataError, LmadaptError

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "DataError",
    "LmadaptError",
    "RunConfig",
    "evaluate",
    "load_config",
    "load_run",
    "predict",
    "train",
]
