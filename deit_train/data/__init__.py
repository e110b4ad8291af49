from deit_train.data.augmented import AugmentedDataModule
from deit_train.data.base import ImageDataModule
from deit_train.data.cifar import CifarDataModule
from deit_train.data.digits import DigitsDataModule
from deit_train.data.fake import FakeDataModule
from deit_train.data.hf import HFDataModule
from deit_train.data.imagefolder import ImageFolderDataModule
from deit_train.data.processor import DeiTImageProcessor
from deit_train.data.recipes import AugmentRecipe, build_mixup
from deit_train.data.samplers import RepeatedAugSampler
from deit_train.data.shards import ShardsDataModule

__all__ = ["AugmentRecipe", "AugmentedDataModule", "CifarDataModule", "DeiTImageProcessor", "DigitsDataModule",
           "FakeDataModule", "HFDataModule", "ImageDataModule", "ImageFolderDataModule", "RepeatedAugSampler",
           "ShardsDataModule", "build_mixup"]
