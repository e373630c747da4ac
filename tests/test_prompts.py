import pytest
import torch

from capt import PromptConfig, PromptedCLIP

MODELS = ["tiny_clip", "vitb32_clip"]
MULTIMODAL = PromptConfig(text_n_ctx=2, text_depth=9, vision_n_ctx=2, vision_depth=9, coupling="maple")


def _pixels(clip, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, clip.image_size, clip.image_size, generator=generator)


@pytest.mark.parametrize("clip_name", MODELS)
def test_without_prompts_the_encoders_are_open_clips(clip_name, request):
    clip = request.getfixturevalue(clip_name)
    model = PromptedCLIP(clip)
    pixels = _pixels(clip, 3)
    reference = clip.model.encode_image((pixels - model.pixel_mean) / model.pixel_std, normalize=True)
    assert torch.equal(model.encode_image(pixels), reference)
    tokens = model.tokenize(["cat", "a very long name of a kind of dog", "x"])
    assert torch.equal(model.encode_text(tokens), clip.model.encode_text(tokens, normalize=True))


@pytest.mark.parametrize("clip_name", MODELS)
def test_disabled_prompts_are_open_clips(clip_name, request):
    clip = request.getfixturevalue(clip_name)
    model = PromptedCLIP(clip, MULTIMODAL)
    pixels = _pixels(clip, 2)
    with model.prompts_disabled():
        tokens = model.tokenize(["cat", "dog"])
        assert torch.equal(model.encode_text(tokens), clip.model.encode_text(tokens, normalize=True))
        reference = clip.model.encode_image((pixels - model.pixel_mean) / model.pixel_std, normalize=True)
        assert torch.equal(model.encode_image(pixels), reference)


def test_text_context_initialised_from_the_hand_prompt(tiny_clip):
    hand = PromptedCLIP(tiny_clip)
    labels = ["cat", "fire truck"]
    expected = tiny_clip.model.encode_text(tiny_clip.tokenizer(["a photo of a cat.", "a photo of a fire truck."]), normalize=True)
    for n_ctx in (2, 4):
        prompted = PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=n_ctx))
        tokens = prompted.tokenize(labels)
        assert tokens.shape[1] == tiny_clip.model.context_length - n_ctx
        with torch.no_grad():
            assert torch.allclose(prompted.encode_text(tokens), expected, atol=1e-6)
    assert torch.allclose(hand.encode_text(hand.tokenize(labels)), expected, atol=1e-6)


def test_long_context_beyond_the_template_starts_random(tiny_clip):
    model = PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=16))
    init = tiny_clip.model.token_embedding.weight[tiny_clip.tokenizer.encode("a photo of a")]
    assert torch.equal(model.text_ctx[-4:].detach(), init)
    assert model.tokenize(["cat"]).shape[1] == tiny_clip.model.context_length - 16


@pytest.mark.parametrize("clip_name", MODELS)
def test_only_prompt_parameters_receive_gradients(clip_name, request):
    clip = request.getfixturevalue(clip_name)
    model = PromptedCLIP(clip, MULTIMODAL)
    logits = model(_pixels(clip, 2), model.tokenize(["cat", "dog", "bird"]))
    logits.logsumexp(-1).sum().backward()
    prompt_names = set(model.prompt_parameters())
    assert prompt_names == {"text_ctx", "text_deep"} | {f"coupling.{i}.{w}" for i in range(model.config.text_depth) for w in ("weight", "bias")}
    for name, parameter in model.named_parameters():
        if name in prompt_names:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("batch,labels", [(1, 1), (3, 5), (16, 2)])
def test_batch_size_and_label_count_are_free(tiny_clip, batch, labels):
    model = PromptedCLIP(tiny_clip, MULTIMODAL)
    names = [f"class {i}" for i in range(labels)]
    with torch.no_grad():
        logits = model(_pixels(tiny_clip, batch), model.tokenize(names))
    assert logits.shape == (batch, labels)
    # The same prompts classify another label set without rebuilding anything.
    with torch.no_grad():
        assert model(_pixels(tiny_clip, batch), model.tokenize(["a", "b", "c"])).shape == (batch, 3)


def test_depth_is_capped_by_the_model(tiny_clip):
    model = PromptedCLIP(tiny_clip, MULTIMODAL)
    layers = len(tiny_clip.model.transformer.resblocks)
    assert model.config.text_depth == model.config.vision_depth == layers
    assert model.text_deep.shape == (layers - 1, 2, tiny_clip.model.transformer.width)


def test_deep_prompts_replace_tokens_at_every_prompted_layer(tiny_clip):
    # A random perturbation, not a constant: LayerNorm erases a constant added to a token, and the
    # features would then differ by rounding noise only (which varies from CPU to CPU).
    torch.manual_seed(1)
    model = PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=2, text_depth=3, vision_n_ctx=2, vision_depth=3))
    pixels, tokens = _pixels(tiny_clip, 2), model.tokenize(["cat", "dog"])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        text, image = model.encode_text(tokens), model.encode_image(pixels)
        # The last prompted layer of each tower: a bug that drops deep prompts after layer 0 leaves
        # the features exactly as they were.
        model.text_deep[-1].add_(torch.randn(model.text_deep[-1].shape, generator=generator))
        model.vision_ctx[-1].add_(torch.randn(model.vision_ctx[-1].shape, generator=generator))
        assert (model.encode_text(tokens) - text).abs().max() > 1e-3
        assert (model.encode_image(pixels) - image).abs().max() > 1e-3


def test_maple_depth_fits_towers_of_different_depth():
    from capt import create_clip
    clip = create_clip("capt-toy-vit")  # 4 vision layers, 3 text layers
    model = PromptedCLIP(clip, MULTIMODAL)
    assert model.config.text_depth == model.config.vision_depth == 3
    assert model(torch.rand(2, 3, 64, 64), model.tokenize(["a", "b"])).shape == (2, 2)


def test_maple_coupling_maps_text_prompts_to_vision_prompts(tiny_clip):
    model = PromptedCLIP(tiny_clip, MULTIMODAL)
    vision = model._vision_prompts()
    assert len(vision) == model.config.vision_depth
    assert vision[0].shape == (2, tiny_clip.model.visual.transformer.width)
    assert torch.allclose(vision[1], model.coupling[1](model.text_deep[0]))


def test_maple_needs_matching_text_and_vision_prompts():
    with pytest.raises(ValueError, match="must be equal"):
        PromptConfig(text_n_ctx=2, vision_n_ctx=4, coupling="maple")
    with pytest.raises(ValueError, match="unknown prompt option"):
        PromptConfig.from_dict({"n_ctx": 2})


def test_prompt_state_round_trip_and_mismatch(tiny_clip):
    source = PromptedCLIP(tiny_clip, MULTIMODAL)
    target = PromptedCLIP(tiny_clip, MULTIMODAL)
    target.load_prompt_state_dict(source.prompt_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(source.prompt_state_dict().values(), target.prompt_state_dict().values()))
    with pytest.raises(ValueError, match="does not fit"):
        PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=4)).load_prompt_state_dict(source.prompt_state_dict())


def test_template_ensemble_averages_class_embeddings(tiny_clip):
    model = PromptedCLIP(tiny_clip)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    with torch.no_grad():
        ensemble = model.encode_labels(["cat", "dog"], templates)
        single = [model.encode_text(model.tokenize(["cat", "dog"], t)) for t in templates]
    expected = torch.nn.functional.normalize(single[0] + single[1], dim=-1)
    assert torch.allclose(ensemble, expected, atol=1e-6)


@pytest.mark.parametrize("text_n_ctx", [0, 4])
def test_fits_context_agrees_with_an_untruncated_token_count(tiny_clip, text_n_ctx):
    model = PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=text_n_ctx))
    labels = ["cat"] + ["a " * n for n in range(20, 40)]
    # Reference: BPE tokens of the full text + start/end, minus the template words the context replaces.
    dropped = model.n_dropped if text_n_ctx else 0
    needed = [len(model.tokenizer.encode(model.config.template.format(label))) + 2 - dropped for label in labels]
    room = model.tokenize(["x"]).shape[1]  # ids per label after tokenize
    expected = [n <= room for n in needed]
    assert model.fits_context(labels) == expected
    assert True in expected and False in expected


@pytest.mark.parametrize("clip_name", MODELS)
def test_identity_deep_init_leaves_the_text_side_as_zero_shot(clip_name, request):
    clip = request.getfixturevalue(clip_name)
    names = ["cat", "a very long name of a kind of dog", "purple star"]
    reference = clip.model.encode_text(PromptedCLIP(clip).tokenize(names), normalize=True)
    gaps = {}
    for init in ("identity", "random"):
        torch.manual_seed(0)
        model = PromptedCLIP(clip, PromptConfig.from_dict({**MULTIMODAL.to_dict(), "text_deep_init": init}))
        assert model.config.text_depth > 1 and model.text_deep.abs().max() > 0
        gaps[init] = (model.encode_text(model.tokenize(names)) - reference).abs().max().item()
    assert gaps["identity"] < 1e-5 and gaps["random"] > 1e-2, gaps  # random deep prompts move every class


def test_text_deep_init_is_checked():
    with pytest.raises(ValueError, match="text_deep_init"):
        PromptConfig(text_deep_init="zeros")
