from deit_train.models.checkpoint import load_student_weights, read_state_dict
from deit_train.models.deit import create_deit, create_timm_classifier, forward_heads, is_distilled

__all__ = [
    "create_deit",
    "create_timm_classifier",
    "forward_heads",
    "is_distilled",
    "load_student_weights",
    "read_state_dict",
]
