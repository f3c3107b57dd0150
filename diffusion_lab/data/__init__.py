from diffusion_lab.data.datamodule import DiffusionDataModule
from diffusion_lab.data.digits import DigitsDataset
from diffusion_lab.data.hf import HFImageDataset
from diffusion_lab.data.image_folder import ImageFolderDataset
from diffusion_lab.data.transforms import ImageTransform

__all__ = ["DiffusionDataModule", "DigitsDataset", "HFImageDataset", "ImageFolderDataset", "ImageTransform"]
