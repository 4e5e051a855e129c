"""DES-MoE's adaptive router: step-0 identity with the pretrained router, KD gradient, lambda."""
import copy

import pytest
import torch

from desmoe.recipes.des_moe.alr import AdaptiveRouter, install_alr, kd_loss, lambda_at
from desmoe.recipes.des_moe.config import ALRConfig
from desmoe.recipes.des_moe.domains import DomainDataConfig, StdlibDomains
from desmoe.models.moe_lm import MoELM, MoELMConfig
from desmoe.moe import LinearRouter, moe_blocks
from tolerance import assert_close, transformer_terms

# tiny_model's forward on real_bytes; the mirror ALR adds its MLP (d -> 4d -> E) before each router
CHAIN = transformer_terms(hidden=32, layers=2, seq=64, ffn=32, heads=2, top_k=2) + 2 * (32 + 4 * 32)


@pytest.fixture(scope="module")
def real_bytes():
    data = StdlibDomains(DomainDataConfig(domains=["email", "xml"], general=[], max_bytes_per_domain=40_000))
    rows = [next(data.batches("train", 8, 64, 0, 0, 1, 0, domains=[d])).input_ids for d in data.domains]
    return torch.cat(rows)  # [16, 65] real text, two pseudo-domains


def tiny_model(seed=0):
    cfg = MoELMConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=64, num_experts=8,
                      top_k=2, ffn_size=32, init_seed=seed)
    model = MoELM(cfg)
    model.setup_expert_parallel()
    with torch.no_grad():  # a router with real preferences, not the near-uniform init
        for b in moe_blocks(model):
            b.router.proj.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("reading", ["residual", "mirror"])
def test_step0_alr_picks_the_pretrained_top_k_on_every_token(real_bytes, reading):
    base = tiny_model()
    alr = copy.deepcopy(base)
    assert install_alr(alr, ALRConfig(init=reading)) == 2
    x = real_bytes[:, :-1]
    with torch.no_grad():
        out_base, out_alr = base(x), alr(x)
    for b_base, b_alr in zip(moe_blocks(base), moe_blocks(alr)):
        ids_base, ids_alr = b_base.last_routing.expert_ids, b_alr.last_routing.expert_ids
        assert ids_base.shape[0] == x.numel()
        assert torch.equal(ids_base, ids_alr), f"{reading}: {(ids_base != ids_alr).any(1).sum()} tokens differ"
        # the teacher inside the ALR is the pretrained router, on the same hidden states
        assert_close(b_alr.router.kd_teacher, b_base.last_routing.logits, terms=CHAIN, msg=f"{reading}: teacher")
        if reading == "residual":
            assert torch.equal(b_alr.last_routing.logits, b_base.last_routing.logits)
    if reading == "residual":
        assert torch.equal(out_base, out_alr), "residual init must reproduce the pretrained model exactly"
    else:
        assert_close(out_alr, out_base, terms=CHAIN, msg="mirror: logits")


def test_literal_gelu_copy_is_not_the_identity(real_bytes):
    """Why the paper's literal init is not the default: W_orig GELU(h) routes differently."""
    base, alr = tiny_model(), None
    alr = copy.deepcopy(base)
    install_alr(alr, ALRConfig(init="gelu_copy"))
    with torch.no_grad():
        base(real_bytes[:, :-1]), alr(real_bytes[:, :-1])
    first = moe_blocks(base)[0].last_routing.expert_ids, moe_blocks(alr)[0].last_routing.expert_ids
    assert (first[0] != first[1]).any(1).float().mean() > 0.05


def test_kd_gradient_equals_independent_autograd_reference(real_bytes):
    torch.manual_seed(0)
    model = tiny_model()
    hidden = model.embed(real_bytes[:, :-1]).reshape(-1, 32).detach()  # real hidden states of real text
    teacher = LinearRouter(32, 8, 2)
    with torch.no_grad():
        teacher.proj.weight.normal_(0, 1.0)
    lam, tau = 0.35, 0.7
    for reading in ("residual", "mirror"):
        router = AdaptiveRouter.from_linear(teacher, ALRConfig(init=reading))
        with torch.no_grad():  # move away from the init so every term is non-zero
            router.mlp_out.weight.normal_(0, 0.1)
            router.mlp_in.bias.normal_(0, 0.1)
        router.lam = lam
        targets = torch.randint(0, 8, (hidden.shape[0],), generator=torch.Generator().manual_seed(1))
        x = hidden.clone().requires_grad_(True)
        logits = router.compute_logits(x)
        task = torch.nn.functional.cross_entropy(logits, targets)  # any differentiable task path
        (task + lam * kd_loss(router.kd_teacher, router.kd_student, tau)).backward()
        params = [router.mlp_in.weight, router.mlp_in.bias, router.mlp_out.weight, router.mlp_out.bias]
        got = [p.grad.clone() for p in params] + [x.grad.clone()]

        # Reference: plain autograd, separate graphs, written from the equations.
        w = [p.detach().clone().requires_grad_(True) for p in params]
        xr = hidden.clone().requires_grad_(True)

        def adapt(h):
            z = torch.nn.functional.gelu(h @ w[0].t() + w[1]) @ w[2].t() + w[3]
            return z + h @ teacher.proj.weight.t() if reading == "residual" else z

        t_logits = (hidden @ teacher.proj.weight.t()).detach()
        p_t = torch.softmax(t_logits / tau, -1)
        kd_ref = (p_t * (torch.log(p_t) - torch.log_softmax(adapt(hidden) / tau, -1))).sum(-1).mean()
        task_ref = torch.nn.functional.cross_entropy(adapt(xr), targets)
        ref = list(torch.autograd.grad(lam * kd_ref + (1 - lam) * task_ref, w, retain_graph=True))
        ref.append(torch.autograd.grad(task_ref, xr)[0])  # hidden states get the task gradient only
        # d -> 4d -> E and back, softmax over E, weight gradients summed over every token
        terms = 2 * (32 + 4 * 32 + 8) + 2 * 8 + hidden.shape[0]
        for name, a, b in zip(["W1", "b1", "W2", "b2", "h"], got, ref):
            assert_close(a, b, terms=terms, msg=f"{reading}: gradient of {name}")
        torch.testing.assert_close(kd_loss(router.kd_teacher, router.kd_student, tau), kd_ref.detach())


def test_lambda_schedule():
    assert lambda_at(0.0) == 1.0
    assert lambda_at(0.2) == pytest.approx(0.8) and lambda_at(0.7) == pytest.approx(0.3)
    assert lambda_at(1.0) == 0.0 and lambda_at(1.3) == 0.0
    assert lambda_at(0.7, end=0.7) == 0.0
