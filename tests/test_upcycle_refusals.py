"""A dense model whose MLP desmoe's experts cannot reproduce is refused before anything is written (a GELU
Llama was upcycled, written, and refused only when the MoE folder was loaded for training)."""
import pytest
from transformers import LlamaConfig

from desmoe.errors import UserError
from desmoe.models.upcycle import check_dense


@pytest.mark.parametrize("act, ok", [("silu", True), ("swish", True), ("gelu", False), ("gelu_pytorch_tanh", False),
                                     ("relu", False)])
def test_only_swiglu_dense_models_upcycle(act, ok):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      hidden_act=act)
    if ok:
        check_dense(cfg, "Mixtral")
        return
    with pytest.raises(UserError) as err:
        check_dense(cfg, "Mixtral")
    assert act in str(err.value) and "'silu'" in str(err.value) and "\n" not in str(err.value)
