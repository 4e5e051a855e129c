"""DES-MoE (arXiv 2509.16882): multi-domain fine-tuning of an MoE LLM without forgetting.

One file per idea of the paper:

* ``alr.py``      -- Adaptive Lightweight Router: MLP router next to the frozen
                     pretrained one, distillation loss, lambda(alpha) (Sec. 3.1);
* ``dges.py``     -- Domain-Guided Expert Specialization: per-layer domain-expert
                     matrix A, mask M, momentum refresh, expert sets S_d (Sec. 3.2);
* ``schedule.py`` -- the three-phase progressive schedule (Sec. 3.3, Eq. 11);
* ``esft.py``     -- the ESFT baselines' expert scores and selection;
* ``config.py``   -- the dataclasses (with every reading of the paper as a switch).
"""
