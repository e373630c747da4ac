import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from capt import PromptConfig, PromptedCLIP, create_clip
from capt.checkpoint import load_prompted_model, save_checkpoint
from export import BundleError, ExportParityError, export_bundle, verify_bundle
from conftest import alter_twin_weights
from export import load_bundle
from export.bundle import IMAGE_ONNX, TEXT_ONNX, bundle_path_from_store, onnx_session, save_to_model_store

MULTIMODAL = PromptConfig(text_n_ctx=2, text_depth=9, vision_n_ctx=2, vision_depth=9, coupling="maple")
LABELS = ["red", "green", "blue"]


def _checkpoint(run_dir, clip):
    torch.manual_seed(3)
    model = PromptedCLIP(clip, MULTIMODAL)
    with torch.no_grad():  # trained-looking prompts, not the initial ones
        for p in model.prompt_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(run_dir, 1, model, {"method": "capt", "classnames": LABELS})


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, colour_folder):
    root = tmp_path_factory.mktemp("export")
    weights = root / "tiny.safetensors"  # the real loading path: a local weights file
    torch.manual_seed(0)  # the same random weights whichever tests ran before
    save_file({k: v.contiguous() for k, v in create_clip("capt-tiny-vit").model.state_dict().items()}, weights)
    checkpoint = _checkpoint(root / "run", create_clip("capt-tiny-vit", str(weights)))
    manifest = export_bundle(checkpoint, root / "bundle", sample_data=f"imagefolder:{colour_folder}:test")
    return root / "bundle", manifest


def test_manifest_records_parity_and_what_serving_needs(tiny_bundle):
    bundle, manifest = tiny_bundle
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["parity"]["top1_samples"] == 18
    assert manifest["tokenizer"]["context_length"] == 30 and manifest["tokenizer"]["prompt_tokens"] == 2
    assert manifest["preprocess"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert manifest["pretrained"].endswith("tiny.safetensors")
    assert manifest["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert set(manifest["files"]) == {"image_encoder.onnx", "text_encoder.onnx", "prompts.safetensors", "prompt_config.json",
                                      "open_clip_config.json", "open_clip_model.safetensors"}
    source, carried = load_file(manifest["pretrained"]), load_file(bundle / "open_clip_model.safetensors")
    assert set(source) == set(carried) and all(torch.equal(source[k], carried[k]) for k in source)
    assert manifest["quick_gelu"] is False
    assert verify_bundle(bundle) == manifest


def test_the_manifest_says_how_to_reproduce_the_token_ids(tiny_bundle):
    bundle, manifest = tiny_bundle
    layout = manifest["tokenizer"]
    assert layout["dropped_template_tokens"] == 2 and len(layout["dropped_token_ids"]) == 2
    tokenizer = open_clip.get_tokenizer("capt-tiny-vit")
    twin = load_bundle(bundle).twin
    for label in ("red", "a long label of several words"):
        ids = tokenizer([layout["template"].format(label)],
                        context_length=layout["context_length"] + layout["dropped_template_tokens"])
        tokens = torch.cat([ids[:, :1], ids[:, 1 + layout["dropped_template_tokens"]:]], dim=1)
        assert torch.equal(tokens, twin.tokenize([label]))
        # The dropped ids are the template's first words, in place right after the start token.
        assert ids[0, 1:1 + layout["dropped_template_tokens"]].tolist() == layout["dropped_token_ids"]


def test_the_twin_is_rebuilt_from_the_bundle_alone(tiny_bundle, tmp_path, monkeypatch):
    import shutil
    import open_clip.factory
    bundle = tmp_path / "moved"
    shutil.copytree(tiny_bundle[0], bundle)
    reference, _ = load_prompted_model(tiny_bundle[0])
    # This machine's model registry is not needed (nor the exporting machine's weights file: the
    # manifest's "pretrained" is a record, never read).
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", {})
    loaded = load_bundle(bundle)
    assert loaded.twin.model_name == "capt-tiny-vit" and not loaded.twin.quick_gelu
    twin_state, reference_state = loaded.twin.state_dict(), reference.state_dict()
    assert set(twin_state) == set(reference_state)
    assert all(torch.equal(twin_state[k], reference_state[k]) for k in twin_state)


@pytest.mark.parametrize("tensor", ["visual.proj", "text_projection"])
def test_a_twin_that_is_not_the_served_model_is_refused_naming_the_graph(tiny_bundle, tmp_path, tensor):
    bundle = alter_twin_weights(tiny_bundle[0], tmp_path / "altered", tensor)
    verify_bundle(bundle)  # every file matches its checksum: the bundle is consistent, the model is not
    graph = "image_encoder.onnx" if tensor.startswith("visual") else "text_encoder.onnx"
    with pytest.raises(BundleError, match=f"twin disagrees with {graph}"):
        load_bundle(bundle)
    load_bundle(bundle, check=False)  # what the check is for: the rest loads without complaint


def test_a_pt_base_model_travels_as_safetensors(tmp_path, colour_folder):
    weights = tmp_path / "tiny.pt"  # a pickle-free torch state dict, as many checkpoints ship
    torch.save(create_clip("capt-tiny-vit").model.state_dict(), weights)
    checkpoint = _checkpoint(tmp_path / "run", create_clip("capt-tiny-vit", str(weights)))
    manifest = export_bundle(checkpoint, tmp_path / "bundle", sample_count=4)
    weights.unlink()
    carried = load_file(tmp_path / "bundle" / "open_clip_model.safetensors")
    assert manifest["files"]["open_clip_model.safetensors"] and "visual.proj" in carried
    assert load_bundle(tmp_path / "bundle").twin is not None


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_onnx_matches_pytorch_at_any_batch(tiny_bundle, batch):
    bundle, manifest = tiny_bundle
    model, _ = load_prompted_model(bundle)
    pixels = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    tokens = model.tokenize([f"label number {i}" for i in range(batch)])
    image = onnx_session(bundle / IMAGE_ONNX).run(None, {"pixels": pixels.numpy()})[0]
    text = onnx_session(bundle / TEXT_ONNX).run(None, {"tokens": tokens.numpy()})[0]
    with torch.no_grad():
        assert np.abs(image - model.encode_image(pixels).numpy()).max() <= 1e-4
        assert np.abs(text - model.encode_text(tokens).numpy()).max() <= 1e-4
    assert image.shape == (batch, 64) and text.shape == (batch, 64)


def test_random_weight_vit_b32_with_prompts_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    checkpoint = _checkpoint(tmp_path / "run", create_clip("ViT-B-32"))
    manifest = export_bundle(checkpoint, tmp_path / "bundle", sample_count=8)
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["top1_agreement"] == 1.0
    assert manifest["inputs"]["text"]["shape"] == ["batch", 75]
    # The served onnx-int8's graph: with the export's value_info kept, ONNX Runtime's quantiser failed on
    # this graph ("Inferred shape and existing shape differ in dimension 0: (512) vs (768)").
    from serving.engine import make_int8_graph
    make_int8_graph(tmp_path / "bundle" / IMAGE_ONNX, tmp_path / "int8.onnx")
    pixels = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    fp32 = onnx_session(tmp_path / "bundle" / IMAGE_ONNX, ["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    int8 = onnx_session(tmp_path / "int8.onnx", ["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    assert int8.shape == fp32.shape == (2, 512) and np.isfinite(int8).all()
    cosine = (int8 * fp32).sum(-1) / (np.linalg.norm(int8, axis=-1) * np.linalg.norm(fp32, axis=-1))
    assert cosine.min() > 0.95  # the same encoder in int8, not another one (unrelated embeddings: ~0)


def test_a_tampered_or_incomplete_bundle_is_refused_by_name(tiny_bundle, tmp_path):
    import shutil
    bundle = tmp_path / "copy"
    shutil.copytree(tiny_bundle[0], bundle)
    graph = bundle / IMAGE_ONNX
    original = graph.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    graph.write_bytes(bytes(tampered))
    with pytest.raises(BundleError, match="image_encoder.onnx: sha256 does not match"):
        verify_bundle(bundle)
    graph.write_bytes(original[:-10])
    with pytest.raises(BundleError, match="image_encoder.onnx: sha256 does not match"):
        verify_bundle(bundle)
    graph.write_bytes(original)
    verify_bundle(bundle)
    (bundle / "prompts.safetensors").unlink()
    with pytest.raises(BundleError, match="prompts.safetensors: missing"):
        verify_bundle(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        verify_bundle(bundle)


def test_parity_failure_writes_nothing(tmp_path, monkeypatch, tiny_clip):
    checkpoint = _checkpoint(tmp_path / "run", tiny_clip)
    monkeypatch.setattr("export.onnx_export.check_parity",
                        lambda *a, **k: {"max_abs_diff": 0.5, "top1_agreement": 0.9, "top1_samples": 10})
    with pytest.raises(ExportParityError, match="disagrees"):
        export_bundle(checkpoint, tmp_path / "bundle", sample_count=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bundle_round_trips_through_the_bentoml_model_store(tiny_bundle):
    import bentoml
    tag = save_to_model_store(tiny_bundle[0], "capt-test")
    stored = bundle_path_from_store(tag)
    assert verify_bundle(stored) == tiny_bundle[1]
    assert str(stored).startswith(os.environ["BENTOML_HOME"])
    assert bentoml.models.get(tag).info.metadata["parity_max_abs_diff"] <= 1e-4
    with pytest.raises(ValueError, match="model name"):
        save_to_model_store(tiny_bundle[0], "../escape")


def test_fp16_export_halves_the_graphs_and_keeps_fp32_inputs_and_outputs(tiny_bundle, tmp_path, colour_folder):
    import onnx
    fp32_bundle, _ = tiny_bundle
    manifest = export_bundle(fp32_bundle, tmp_path / "fp16", sample_data=f"imagefolder:{colour_folder}:test",
                             precision="fp16")
    bundle = tmp_path / "fp16"
    assert manifest["precision"] == "fp16" and manifest["parity"]["bar"]["max_abs_diff"] == 2e-3
    assert manifest["parity"]["top1_samples"] == 18 and manifest["parity"]["top1_agreement"] >= 0.98
    graph = onnx.load(bundle / IMAGE_ONNX)
    weight_types = {init.data_type for init in graph.graph.initializer if len(init.dims) >= 2}
    assert weight_types == {onnx.TensorProto.FLOAT16}
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weight_bytes = lambda g: sum(len(i.raw_data) for i in g.graph.initializer)  # noqa: E731
    assert weight_bytes(graph) < 0.55 * weight_bytes(onnx.load(fp32_bundle / IMAGE_ONNX))
    model, _ = load_prompted_model(fp32_bundle)
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    image = onnx_session(bundle / IMAGE_ONNX).run(None, {"pixels": pixels.numpy()})[0]
    with torch.no_grad():
        diff = np.abs(image - model.encode_image(pixels).numpy()).max()
    assert image.dtype == np.float32 and 1e-6 < diff <= 2e-3  # rounded, but close
    assert verify_bundle(bundle) == manifest


def test_unknown_precision_is_refused(tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="precision 'int4'"):
        export_bundle(tiny_bundle[0], tmp_path / "b", precision="int4")


def test_near_ties_do_not_count_as_disagreements_but_clear_flips_do():
    from export.onnx_export import top1_agreement
    reference = np.array([[0.50, 0.10, 0.0], [0.30, 0.2995, 0.0], [0.1, 0.6, 0.2], [0.9, 0.0, 0.1]])
    candidate = reference + 0.001 * np.array([[1, -1, 0], [-1, 1, 0], [0, 0, 0], [0, 0, 0]])  # flips the tie only
    tie_flipped = top1_agreement(reference, candidate)
    assert tie_flipped["top1_near_ties"] == 1 and tie_flipped["top1_agreement"] == 1.0
    assert tie_flipped["top1_agreement_all"] == 0.75
    candidate[3] = [0.0, 0.9, 0.1]  # a clear flip: counted (and it widens the error, so more are ties)
    clear = top1_agreement(reference, candidate)
    assert clear["top1_agreement"] < 1.0 and clear["top1_agreement_all"] == 0.5
