"""``engine.activation_checkpointing``: layers are recomputed in backward, and the loss and
gradients are the ones without it (the built-in GPT per block, an HF Llama through its own
gradient checkpointing), taken through the engine's ``register`` as a recipe takes them."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from athanor.config import ConfigError, EngineConfig, OptimConfig, RunConfig, TrainConfig
from athanor.engine import Engine
from athanor.models import AthanorGPT, AthanorGPTConfig


def gpt():
    torch.manual_seed(0)
    return AthanorGPT(AthanorGPTConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def loss_grads_and_forwards(tmp_path, build, checkpointing: bool):
    """Loss, gradients and the number of times the layers ran for one forward + backward."""
    cfg = TrainConfig(run=RunConfig(output_dir=str(tmp_path / str(checkpointing)), progress=False),
                      optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                      engine=EngineConfig(activation_checkpointing=checkpointing))
    engine = Engine(cfg)
    model = engine.register("model", build())
    layers = model.blocks if hasattr(model, "blocks") else model.model.layers
    calls = []
    for layer in layers:  # a module inside the layer: the recompute runs it again (hooks on the layer stay outside)
        next(layer.children()).register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], len(calls), len(layers)


@pytest.mark.parametrize("build", [gpt, llama], ids=["athanor-gpt", "hf-llama"])
def test_same_loss_and_gradients_with_layers_recomputed(tmp_path, build):
    loss, grads, calls, layers = loss_grads_and_forwards(tmp_path, build, False)
    loss_ac, grads_ac, calls_ac, _ = loss_grads_and_forwards(tmp_path, build, True)
    assert calls == layers and calls_ac == 2 * layers  # each layer ran again in backward
    assert torch.allclose(loss, loss_ac, rtol=0, atol=1e-6)
    for g, g_ac in zip(grads, grads_ac):
        assert torch.allclose(g, g_ac, rtol=1e-5, atol=1e-6)


def test_a_model_that_cannot_recompute_is_refused(tmp_path):
    cfg = TrainConfig(run=RunConfig(output_dir=str(tmp_path), progress=False),
                      engine=EngineConfig(activation_checkpointing=True))
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        Engine(cfg).register("model", torch.nn.Linear(4, 4))
