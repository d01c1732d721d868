"""Recipes: what differs between the platform's training methods, behind one interface the training loop calls.

A recipe owns its config (``TrainJobConfig.recipe``, told apart by ``kind``), builds its model from a registered
architecture, computes its loss as named terms, and may act after each optimiser step (an EMA teacher). The Ray
Train loop, checkpoints, resume, metrics, export and the job CLI (``ogclip_jobs.train``) are shared by every
recipe. ``og-clip`` (:class:`OGCLIPRecipe`) is the first; ``detail-clip`` and ``mps-clip`` follow.
"""

from ogclip.recipes.base import Recipe, TrainBatch, create_recipe, list_recipes, register_recipe
from ogclip.recipes.detail_clip import DetailCLIPRecipe
from ogclip.recipes.mps_clip import MPSCLIPRecipe
from ogclip.recipes.og_clip import OGCLIPRecipe

__all__ = ["DetailCLIPRecipe", "MPSCLIPRecipe", "OGCLIPRecipe", "Recipe", "TrainBatch", "create_recipe", "list_recipes",
           "register_recipe"]
