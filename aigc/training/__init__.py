"""Training: one loop (:func:`train`) and a recipe per model family.

    from aigc.training import GANRecipe, TrainData, Hooks, train
    result = train(cfg, GANRecipe(cfg, net), TrainData(images, labels), Hooks(on_steps=...), seed=42)

``train_gan``, ``train_vae`` and ``train_pixelcnn`` are that call with the family's recipe built for you.
"""

from aigc.training.checkpoint import CHECKPOINT_FORMAT, check_resume, fingerprint, resumable, rng_state, \
    set_rng_state, why_not
from aigc.training.gan import GANRecipe, train_gan
from aigc.training.loop import Batch, EpochEnd, Hooks, Recipe, Setup, Stateful, StepWindow, TrainData, \
    TrainingDiverged, TrainResult, probe_machine, train
from aigc.training.pixelcnn import PixelCNNRecipe, train_pixelcnn
from aigc.training.recipes import family_train, recipe_for, split_data
from aigc.training.vae import VAERecipe, neg_elbo, train_vae

__all__ = ["CHECKPOINT_FORMAT", "Batch", "EpochEnd", "GANRecipe", "Hooks", "PixelCNNRecipe", "Recipe", "Setup", "Stateful", "StepWindow",
           "TrainData", "TrainResult", "TrainingDiverged", "VAERecipe", "check_resume", "family_train", "fingerprint", "neg_elbo",
           "probe_machine", "recipe_for", "split_data", "resumable", "rng_state", "set_rng_state", "train", "train_gan",
           "train_pixelcnn", "train_vae", "why_not"]
