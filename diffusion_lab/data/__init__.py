from diffusion_lab.data.datamodule import DiffusionDataModule
from diffusion_lab.data.sources import DigitsDataset, HFImageDataset, ImageFolderDataset
from diffusion_lab.data.transforms import ImageTransform

__all__ = ["DiffusionDataModule", "DigitsDataset", "HFImageDataset", "ImageFolderDataset", "ImageTransform"]
