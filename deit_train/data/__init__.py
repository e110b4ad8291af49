from deit_train.data.base import ImageDataModule
from deit_train.data.digits import DigitsDataModule
from deit_train.data.imagefolder import ImageFolderDataModule

__all__ = ["DigitsDataModule", "ImageDataModule", "ImageFolderDataModule"]
