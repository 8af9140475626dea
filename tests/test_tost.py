"""ToST / TSSA (lra.attention.tost): the formula re-derived directly, masking, gradients, long inputs."""

from __future__ import annotations

import pytest
import torch

import lra.attention as attention

DIM, HEADS = 32, 4


def _build(seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    attn = attention.build("tost", dim=DIM, num_heads=HEADS, **options).to(dtype).eval()
    with torch.no_grad():  # a temperature per head that is not 1, so its role is tested
        attn.temp.copy_(torch.linspace(0.5, 2.0, HEADS)[:, None])
    return attn


def _direct(attn, x):
    """TSSA of one unpadded sequence ``x: [N, DIM]`` with a loop over heads and plain sums."""
    dh = DIM // HEADS
    rows = [slice(h * dh, (h + 1) * dh) for h in range(HEADS)]
    w = [x @ attn.qkv.weight[r].T + attn.qkv.bias[r] for r in rows]
    energy = torch.stack([(wh**2 / (wh**2).sum(0)).sum(1) for wh in w])  # [H, N]
    pi = torch.softmax(energy * attn.temp, dim=0)  # over heads
    out = []
    for h in range(HEADS):
        s = torch.einsum("n,nd->d", pi[h] / (pi[h].sum() + 1e-8), w[h] ** 2)
        out.append(-w[h] * pi[h][:, None] / (1 + s))
    return attn.out_proj(torch.cat(out, dim=1))


def test_matches_direct_derivation_unpadded():
    attn = _build()
    x = torch.randn(3, 50, DIM, dtype=torch.float64)
    mask = torch.ones(3, 50, dtype=torch.bool)
    with torch.no_grad():
        got = attn(x, mask)
        want = torch.stack([_direct(attn, xi) for xi in x])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_padded_batch_equals_truncated_sequences():
    attn = _build()
    x = torch.randn(3, 50, DIM, dtype=torch.float64)
    lengths = (50, 31, 1)
    mask = torch.arange(50)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y = attn(x, mask)
        for i, n in enumerate(lengths):
            torch.testing.assert_close(y[i, :n], _direct(attn, x[i, :n]), rtol=1e-12, atol=1e-12)
            alone = attn(x[i : i + 1, :n], mask[i : i + 1, :n])[0]
            torch.testing.assert_close(y[i, :n], alone, rtol=1e-12, atol=1e-12)
        # padded tokens have Π = 0: their output is out_proj(0)
        torch.testing.assert_close(y[~mask], attn.out_proj.bias.expand(int((~mask).sum()), DIM))


def test_padding_content_does_not_leak():
    attn = _build()
    x = torch.randn(2, 40, DIM, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    other = x.clone()
    other[~mask] = 1e3 * torch.randn_like(other[~mask])
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask)[mask], attn(other, mask)[mask], rtol=1e-12, atol=1e-12)


def test_gradient_reaches_the_temperature():
    attn = _build(dtype=torch.float32).train()
    x = torch.randn(2, 64, DIM)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[0, 40:] = False
    attn(x, mask)[mask].square().mean().backward()
    assert attn.temp.grad is not None and (attn.temp.grad != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_at_16k_tokens(dtype):
    attn = _build(dtype=dtype)
    x = torch.randn(1, 16384, DIM, dtype=dtype)
    mask = torch.ones(1, 16384, dtype=torch.bool)
    mask[0, 16000:] = False
    with torch.no_grad():
        assert torch.isfinite(attn(x, mask)).all()


def test_temperature_is_exempt_from_weight_decay():
    from lra.models import build_model
    from lra.module import LRAModule

    encoder = dict(depth=2, dim=32, num_heads=2, mlp_dim=64, dropout=0.0, attention_dropout=0.0, pooling="mean",
                   pos_emb="learned", embed_init_std=0.02, attention_fp32=False, head_hidden=32)
    model = build_model(encoder, "tost", {}, vocab_size=10, max_len=16, num_classes=3, dual=False)
    optim = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-6, weight_decay=0.1, schedule="constant", warmup_steps=0)
    decayed, exempt = LRAModule(model, optim, max_steps=10).parameter_groups()
    temps = {id(block.attention.temp) for block in model.encoder.blocks}
    assert {id(p) for p in exempt["params"]} == temps and exempt["weight_decay"] == 0.0
    assert decayed["weight_decay"] == 0.1 and not temps & {id(p) for p in decayed["params"]}


@pytest.mark.parametrize("n", [7, 2000])
def test_token_energies_sum_to_the_head_width_whatever_the_length(n):
    """Σ_n Σ_d ŵ² = Dh exactly: the energies average Dh / N, so Π flattens towards 1/H as N grows."""
    from lra.attention.tost import token_energy

    dh = DIM // HEADS
    w = torch.randn(2, HEADS, n + 5, dh, dtype=torch.float64) * torch.logspace(-3, 3, dh, dtype=torch.float64)
    real = torch.ones(2, n + 5, dtype=torch.bool)
    real[0, n:] = False
    w = w * real[:, None, :, None]
    energy = token_energy(w)
    torch.testing.assert_close(energy.sum(-1), torch.full((2, HEADS), float(dh), dtype=torch.float64))
    assert (energy[0, :, n:] == 0).all()
    torch.testing.assert_close(energy[0, :, :n], token_energy(w[:1, :, :n])[0])
