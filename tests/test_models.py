import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from capt import create_clip, list_models, pixel_transform
from capt.models import PretrainedUnavailable


def test_project_configs_are_registered():
    assert "capt-tiny-vit" in list_models()
    assert "ViT-B-32" in list_models()


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        create_clip("no-such-model")


def test_clip_is_frozen_and_in_eval(tiny_clip):
    assert not any(p.requires_grad for p in tiny_clip.model.parameters())
    assert not tiny_clip.model.training
    assert tiny_clip.image_size == 32


def test_unknown_pretrained_tag_says_what_to_pass():
    with pytest.raises(PretrainedUnavailable, match="neither a local checkpoint file nor a pretrained tag"):
        create_clip("capt-tiny-vit", "no-such-tag")


def test_hub_weights_offline_fail_with_instructions():
    with pytest.raises(PretrainedUnavailable, match="pass its local path"):
        create_clip("ViT-B-32", "openai")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_loads_the_saved_weights(tiny_clip, tmp_path, suffix):
    state = {k: v.clone() for k, v in create_clip("capt-tiny-vit").model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    loaded = create_clip("capt-tiny-vit", str(path)).model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not torch.equal(loaded["visual.proj"], tiny_clip.model.state_dict()["visual.proj"])


class NotWeights:
    pass


def test_pickled_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": NotWeights()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        create_clip("capt-tiny-vit", str(path))


def test_pixel_transform_gives_unnormalised_pixels(tiny_clip):
    image = Image.new("L", (50, 80), color=255)  # grayscale, not square
    pixels = pixel_transform(tiny_clip.preprocess_cfg)(image)
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, torch.ones_like(pixels))
