"""The frozen teacher: the network (:mod:`.network`), what its file says it is (:mod:`.identity`), and the
teacher-logit cache that replaces its forward in sweeps (:mod:`.cache`)."""
from deit_train.teacher.identity import TeacherIdentity, read_teacher_identity, teacher_file
from deit_train.teacher.network import FrozenTeacher

__all__ = ["FrozenTeacher", "TeacherIdentity", "read_teacher_identity", "teacher_file"]
