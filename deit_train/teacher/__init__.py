"""The frozen teacher: the network (:mod:`.network`), what its file says it is (:mod:`.identity`), and the
teacher-logit cache that replaces its forward in sweeps (:mod:`.cache`), ensembles of teachers (:mod:`.ensemble`)."""
from deit_train.teacher.identity import TeacherIdentity, read_teacher_identity, teacher_file
from deit_train.teacher.ensemble import TeacherEnsemble
from deit_train.teacher.network import FrozenTeacher

__all__ = ["FrozenTeacher", "TeacherEnsemble", "TeacherIdentity", "read_teacher_identity", "teacher_file"]
