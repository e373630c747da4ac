"""Gradient checkpointing of the towers' blocks changes memory, not results: the same loss and the same
prompt gradients as the plain forward, for every prompt kind."""
import torch
import torch.utils.checkpoint

from capt import default_model
from capt.models import create_clip
from capt.prompts import PromptConfig, PromptedCLIP

CONFIG = PromptConfig(text_n_ctx=2, text_depth=3, vision_n_ctx=2, vision_depth=3, coupling="maple")


def _loss_and_grads(model, images, labels):
    model.zero_grad(set_to_none=True)
    logits = model.logits(model.encode_image(images), model.encode_labels(["red", "green", "blue"]))
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.prompt_parameters().items() if p.grad is not None}


def _count_checkpoints(monkeypatch) -> list:
    calls, real = [], torch.utils.checkpoint.checkpoint

    def checkpoint(function, *args, **kwargs):
        calls.append(function)
        return real(function, *args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    return calls


def test_checkpointed_blocks_give_the_plain_loss_and_gradients(monkeypatch):
    calls = _count_checkpoints(monkeypatch)
    torch.manual_seed(0)
    clip = create_clip(default_model.ARCHITECTURE, str(default_model.WEIGHTS))
    model = PromptedCLIP(clip, CONFIG)
    with torch.no_grad():  # random prompts, so that the gradient is not that of the hand prompt
        for p in model.prompt_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    plain_loss, plain = _loss_and_grads(model, images, labels)
    assert not calls
    model.set_grad_checkpointing(True)
    checkpointed_loss, checkpointed = _loss_and_grads(model, images, labels)
    blocks = len(model.clip.transformer.resblocks) + len(model.clip.visual.transformer.resblocks)
    assert len(calls) == blocks  # every block of both towers ran checkpointed
    assert plain and plain.keys() == checkpointed.keys()
    assert torch.allclose(plain_loss, checkpointed_loss, rtol=0, atol=1e-6)
    for name in plain:
        assert plain[name].abs().max() > 0, name
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7), name


def test_checkpointing_is_off_by_default_and_a_no_grad_forward_ignores_it(monkeypatch):
    calls = _count_checkpoints(monkeypatch)
    clip = create_clip("capt-tiny-vit", "none")
    model = PromptedCLIP(clip, CONFIG)
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        features = model.encode_image(torch.rand(2, 3, 32, 32))
    assert features.shape[0] == 2 and not features.requires_grad and not calls
