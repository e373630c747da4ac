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


@pytest.fixture(scope="module")
def vitb32_weights_file(vitb32_clip, tmp_path_factory):
    """ViT-B-32 weights on disk, standing in for OpenAI's (the activation does not change the tensors)."""
    path = tmp_path_factory.mktemp("vitb32") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in vitb32_clip.model.state_dict().items()}, path)
    return path


def test_openai_tag_builds_the_quickgelu_net_it_was_trained_as(vitb32_weights_file, monkeypatch):
    import open_clip.factory
    from capt.models import uses_quick_gelu
    asked = []

    def local_download(cfg, cache_dir=None):  # open_clip's real tag path, with the file already "downloaded"
        asked.append(cfg)
        return str(vitb32_weights_file)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", local_download)
    clip = create_clip("ViT-B-32", "openai")
    assert asked and asked[0]["quick_gelu"] is True  # the 'openai' tag of ViT-B-32 was what open_clip fetched
    assert clip.quick_gelu and uses_quick_gelu(clip.model) and clip.model_cfg["quick_gelu"] is True
    # Without the factory's choice, open_clip builds GELU for the same call (and only warns):
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):
        plain = open_clip.create_model("ViT-B-32", pretrained="openai")
    assert not uses_quick_gelu(plain)
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (clip.model.encode_image(pixels, normalize=True) - plain.encode_image(pixels, normalize=True)).abs().max()
    assert gap > 1e-4  # different networks on the same weights (random weights: ~7e-4; float noise ~1e-7)


def test_local_files_take_the_activation_from_the_name_or_the_option(vitb32_weights_file):
    assert not create_clip("ViT-B-32", str(vitb32_weights_file)).quick_gelu
    assert create_clip("ViT-B-32-quickgelu", str(vitb32_weights_file)).quick_gelu
    assert create_clip("ViT-B-32", str(vitb32_weights_file), quick_gelu=True).quick_gelu
    with pytest.raises(ValueError, match="QuickGELU architecture"):
        create_clip("ViT-B-32-quickgelu", str(vitb32_weights_file), quick_gelu=False)


def test_an_option_contradicting_the_tag_is_refused():
    with pytest.raises(ValueError, match="trained with QuickGELU"):
        create_clip("ViT-B-32", "openai", quick_gelu=False)


def test_checkpoints_record_the_activation(tiny_clip, tmp_path):
    from capt import PromptConfig, PromptedCLIP
    from capt.checkpoint import load_prompted_model, save_checkpoint
    model = PromptedCLIP(create_clip("capt-tiny-vit", quick_gelu=True), PromptConfig(text_n_ctx=2))
    save_checkpoint(tmp_path, 1, model, {})
    loaded, meta = load_prompted_model(tmp_path)
    assert meta["quick_gelu"] is True and loaded.quick_gelu
