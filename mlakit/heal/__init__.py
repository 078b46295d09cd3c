"""Healing: knowledge distillation of a converted MLA model toward its original.

- ``mlakit.heal.distill``: the KL distillation loop (``HealOptions``, ``heal_model``);
- ``mlakit.heal.layerwise``: optional layer-wise initialisation of the MLA attention;
- ``mlakit.heal.elastic``: Matryoshka-style training of elastic ranks (``mlakit.elastic``
  truncates at run time);
- ``mlakit.heal.data``: teacher-written training text, and checks that refuse evaluation data;
- ``mlakit.heal.api``: ``heal()``, what ``mlakit heal`` runs.

Nothing here imports matplotlib unless a plot is written.
"""

from mlakit.heal.data import TeacherDataOptions
from mlakit.heal.distill import HealOptions, heal_model
from mlakit.heal.elastic import LatentMask

__all__ = ["HealOptions", "LatentMask", "TeacherDataOptions", "heal_model"]
