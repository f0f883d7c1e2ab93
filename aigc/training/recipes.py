"""The recipe for a model family, built from the params and what dataset.json says of the data."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aigc.config import DPConfig, ModelConfig, PixelCNNConfig, TrainConfig, VAEConfig
from aigc.models import conditioning, net_config
from aigc.training.gan import GANRecipe
from aigc.training.loop import Recipe, TrainData
from aigc.training.pixelcnn import PixelCNNRecipe
from aigc.training.vae import VAERecipe


def split_data(split: dict[str, np.ndarray], recipe: Recipe) -> TrainData:
    """A split as the recipe's net takes it: tensors, and class indices when it is conditional."""
    net = recipe.net
    return TrainData(torch.from_numpy(split["images"]), net.class_indices(split["labels"]) if net.conditional else None)


def recipe_for(model: ModelConfig, train: TrainConfig, vae: VAEConfig, dp: DPConfig, info: dict[str, Any],
               split: dict[str, np.ndarray], pixelcnn: PixelCNNConfig | None = None) -> tuple[Recipe, TrainData, str]:
    """(the family's recipe, the train split as tensors, why it is (un)conditional in words).

    ``model.conditional: true`` on data that cannot support it is a UserError naming what is
    missing; "auto" conditions when every training image is labelled and there are 2+ classes.
    """
    conditional, why = conditioning(model, info)
    pixelcnn = pixelcnn or PixelCNNConfig()
    net = net_config(model, info, conditional, pixelcnn)
    recipe: Recipe = (VAERecipe(vae, net) if model.family == "vae" else PixelCNNRecipe(pixelcnn, net)
                      if model.family == "pixelcnn" else GANRecipe(train, net, dp))
    return recipe, split_data(split, recipe), why


def family_train(model: ModelConfig, train: TrainConfig, pixelcnn: PixelCNNConfig | None = None) -> TrainConfig:
    """The train section as ``model.family`` trains: the pixelcnn family runs its own
    ``pixelcnn.epochs`` (null: ``train.epochs``); the other families the section as it is."""
    epochs = (pixelcnn or PixelCNNConfig()).epochs
    if model.family == "pixelcnn" and epochs is not None:
        return train.model_copy(update={"epochs": epochs})
    return train

