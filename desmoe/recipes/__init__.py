"""Recipes: what each method adds to the one training loop (desmoe/training/trainer.py).

* ``lm/``      -- language-model training: the core's smoke job and pretraining (one LM step);
* ``des_moe/`` -- DES-MoE (arXiv 2509.16882) and its baselines: multi-domain fine-tuning of an MoE LLM;
* ``trge/``    -- TRGE (arXiv 2508.07738) and its baselines: continual learning of CLIP, one stage per task.

Each package has the same shape: ``recipe.py`` (the Recipe and the run's entry point), ``config.py``
(the experiment's sections; lm's few live in recipe.py), ``baselines.py`` (method classes picked by
config), and one file per idea of its paper.  ``desmoe`` (the top-level package) is the framework;
``des_moe`` is the method.
"""
