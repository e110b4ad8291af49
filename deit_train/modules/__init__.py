from deit_train.modules.classification import ClassificationModule
from deit_train.modules.optim import OptimRecipe

__all__ = ["ClassificationModule", "OptimRecipe"]
