"""Language-model recipes: ``recipe.py`` (the shared LM step; the smoke job on desmoe's MoELM) and
``pretrain.py`` (HF MoE pretraining: warm-up + cosine LR, HF export and a report)."""
