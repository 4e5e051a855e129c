"""Expert-parallel MoE core on DeepSpeed. Knows nothing of DES-MoE or TRGE."""
from desmoe.moe.dispatcher import DispatchStats, ExpertDispatcher
from desmoe.moe.experts import (AdapterExpert, ClampedSwiGLUExpert, MLPExpert, SwiGLUExpert, build_expert,
                                init_local_experts)
from desmoe.moe.layer import (MoEBlock, global_tokens_per_expert, moe_blocks, total_aux_loss,
                              update_selection_biases)
from desmoe.moe.layout import ExpertLayout
from desmoe.moe.router import LinearRouter, Router, Routing, load_balancing_loss

__all__ = [
    "AdapterExpert", "ClampedSwiGLUExpert", "DispatchStats", "ExpertDispatcher", "ExpertLayout", "LinearRouter",
    "MLPExpert",
    "MoEBlock", "Router", "Routing", "SwiGLUExpert", "build_expert", "global_tokens_per_expert",
    "init_local_experts", "load_balancing_loss", "moe_blocks", "total_aux_loss", "update_selection_biases",
]
