"""Convergence: the pretrain model trained with the fused linear-CE head vs the reference head."""
import torch

from athanor.models import AthanorGPT, AthanorGPTConfig


def train(fused: bool, steps: int = 50) -> list[float]:
    torch.manual_seed(0)
    cfg = AthanorGPTConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=33,
                           qk_layernorm=True, z_loss_weight=1e-3, fused_loss=fused)
    model = AthanorGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 300, (8, 33), generator=torch.Generator().manual_seed(1))
    data[:, 1::2] = (data[:, 0::2][:, :16] * 7 + 3) % 300  # learnable structure: the loss must fall
    losses = []
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fused_head_trains_like_the_reference():
    ref, fused = train(False), train(True)
    assert ref[-1] < ref[0] - 1.0  # it learned something, so the comparison means something
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=2e-3, atol=2e-3)
