"""deit_train: Lightning + Hydra training of DeiT students, with distillation from a frozen teacher."""
from deit_train.run.config import register_resolvers

register_resolvers()

from deit_train.data.processor import DeiTImageProcessor  # noqa: E402  (inference preprocessing)

__version__ = "0.1.0"
