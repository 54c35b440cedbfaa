"""`vision-gpt export-onnx` and the ONNX Runtime captioner: parity with PyTorch on tiny random models, both fusions."""

import json

import numpy as np
import pytest
import torch

EXTRA = "pip install 'vision-gpt[onnx]'"
pytest.importorskip("onnx", reason=f"ONNX export needs the onnx extra: {EXTRA}")
pytest.importorskip("onnxruntime", reason=f"ONNX Runtime captioning needs the onnx extra: {EXTRA}")

from .conftest import random_images, tiny_model  # noqa: E402
from vision_gpt.cli import commands as cli  # noqa: E402
from vision_gpt.export import onnx as onnx_export  # noqa: E402
from vision_gpt.export.onnx import ONNXExportError, export_onnx  # noqa: E402
from vision_gpt.modeling.compat_vision_gpt import CACHE_NAME  # noqa: E402
from vision_gpt.inference.onnx_runtime import ONNXCaptioner  # noqa: E402

FUSIONS = ["cross_attention", "prefix"]


@pytest.fixture(scope="module", params=FUSIONS)
def exported(request, processor, tmp_path_factory):
    """(model, folder) for each fusion, exported in fp32 with its int8 variants."""
    model = tiny_model(fusion=request.param)
    folder = tmp_path_factory.mktemp(f"onnx-{request.param}")
    export_onnx(model, processor, folder, quantize="int8", overwrite=True)
    return model, folder


def _pytorch_captions(model, processor, images, num_beams, max_new_tokens=10):
    pixel_values = processor(images=images)["pixel_values"]
    # The plain layers: the packed oneDNN ones round differently, and the export traces the plain ones.
    ids = model.generate(pixel_values=pixel_values, num_beams=num_beams, max_new_tokens=max_new_tokens,
                         use_packed_linears=False)
    return processor.batch_decode(ids)


def test_first_and_cached_step_logits_match_pytorch(exported, processor):
    model, folder = exported
    captioner = ONNXCaptioner(folder)
    pixel_values = processor(images=random_images(2))["pixel_values"]
    start = torch.full((2, 1), model.config.bos_token_id)
    next_ids = torch.tensor([[464], [257]])
    with torch.no_grad():
        first = model(input_ids=start, pixel_values=pixel_values)
        # The cache's name differs between transformers releases (`cache` from 5.24, `past_key_values` before).
        second = model(input_ids=next_ids, **{CACHE_NAME: getattr(first, CACHE_NAME)})
        expected_visual = model.get_image_features(pixel_values=pixel_values).pooler_output

    visual = captioner.encode(pixel_values.numpy())
    # The tiny mapper is scaled up (conftest), so its tokens reach thousands: float32 rounding relative to them.
    np.testing.assert_allclose(visual, expected_visual.numpy(), atol=1e-6 * float(expected_visual.abs().max()))
    logits, past = captioner._first_step(visual, model.config.bos_token_id)
    np.testing.assert_allclose(logits, first.logits[:, -1].numpy(), atol=1e-4)
    mask = np.ones((2, past[0].shape[2] + 1), dtype=np.int64)
    logits, _ = captioner.step(next_ids.numpy(), mask, captioner._next_visual(visual), past)
    np.testing.assert_allclose(logits[:, -1], second.logits[:, -1].numpy(), atol=1e-4)


def test_cached_step_reads_the_cross_keys_and_values_from_the_past(exported, processor):
    model, folder = exported
    if model.config.fusion != "cross_attention":
        pytest.skip("a prefix model has no cross-attention")
    captioner = ONNXCaptioner(folder)
    pixel_values = processor(images=random_images(2, seed=8))["pixel_values"]
    start = torch.full((2, 1), model.config.bos_token_id)
    next_ids = torch.tensor([[464], [257]])
    with torch.no_grad():
        first = model(input_ids=start, pixel_values=pixel_values)
        second = model(input_ids=next_ids, **{CACHE_NAME: getattr(first, CACHE_NAME)})
    visual = captioner.encode(pixel_values.numpy())
    _, past = captioner._first_step(visual, model.config.bos_token_id)
    encoder_past = [states for (name, _, _), states in zip(captioner.past, past) if ".encoder." in name]
    assert len(encoder_past) == 4 and all(states.shape == (2, 4, visual.shape[1], 8) for states in encoder_past)
    # The visual tokens zeroed: the step's logits are still PyTorch's, so it read the cross keys and values cached on
    # the first step and projected none of the tokens again.
    mask = np.ones((2, past[0].shape[2] + 1), dtype=np.int64)
    logits, present = captioner.step(next_ids.numpy(), mask, np.zeros_like(visual), past)
    np.testing.assert_allclose(logits[:, -1], second.logits[:, -1].numpy(), atol=1e-4)
    for (name, _, _), old, new in zip(captioner.past, past, present):
        if ".encoder." in name:
            np.testing.assert_array_equal(new, old)
    # The graph itself returns an empty cross present on a cached step: it reads the past in place and never copies
    # it (transformers.js then keeps the past's, as with optimum's decoders).
    feeds = {"input_ids": next_ids.numpy(), "attention_mask": mask, "encoder_hidden_states": visual,
             **{name: states for (name, _, _), states in zip(captioner.past, past)}}
    names = [meta.name for meta in captioner.decoder.get_outputs()]
    outputs = dict(zip(names, captioner.decoder.run(None, feeds)))
    assert [outputs[name].shape[2] for name in names if ".encoder." in name] == [0] * 4


def test_a_step_completes_a_partial_cross_attention_past(exported, processor):
    model, folder = exported
    if model.config.fusion != "cross_attention":
        pytest.skip("a prefix model has no cross-attention")
    captioner = ONNXCaptioner(folder)
    visual = captioner.encode(processor(images=random_images(2, seed=9))["pixel_values"].numpy())
    _, past = captioner._first_step(visual, model.config.bos_token_id)
    # A past that holds the first 3 visual tokens' keys and values: the step projects the others and appends them.
    partial = [states[:, :, :3] if static else states for states, static in zip(past, captioner.static_past)]
    next_ids, mask = np.array([[464], [257]]), np.ones((2, past[0].shape[2] + 1), dtype=np.int64)
    logits, present = captioner.step(next_ids, mask, visual, past)
    partial_logits, partial_present = captioner.step(next_ids, mask, visual, partial)
    np.testing.assert_allclose(partial_logits, logits, atol=1e-4)
    for completed, full in zip(partial_present, present):
        np.testing.assert_allclose(completed, full, atol=1e-5)


def test_greedy_captions_equal_pytorch(exported, processor):
    model, folder = exported
    images = random_images(3, seed=1)
    expected = _pytorch_captions(model, processor, images, num_beams=1)
    assert ONNXCaptioner(folder)(images, num_beams=1, max_new_tokens=10) == expected
    assert len(set(expected)) > 1  # the images lead to different captions: equality means something


def test_beam_search_keeps_one_copy_of_each_images_cross_attention_past(exported, processor):
    model, folder = exported
    if model.config.fusion != "cross_attention":
        pytest.skip("a prefix model has no cross-attention")
    captioner = ONNXCaptioner(folder)
    step, calls = captioner.step, []

    def recording_step(input_ids, attention_mask, visual, past):
        cross = {states.shape[0] for (name, _, _), states in zip(captioner.past, past) if ".encoder." in name}
        calls.append((input_ids.shape[0], cross, visual.shape[0]))
        return step(input_ids, attention_mask, visual, past)

    captioner.step = recording_step
    pixel_values = processor(images=random_images(2, seed=3))["pixel_values"]
    captioner.generate(pixel_values.numpy(), num_beams=3, max_new_tokens=5)
    # The first step runs once per image; later ones run 2 x 3 beams against one cross past per image.
    assert calls[0] == (2, {2}, 2) and len(calls) > 1
    assert all(call == (6, {2}, 2) for call in calls[1:])


def test_beam_captions_equal_pytorch(exported, processor):
    model, folder = exported
    images = random_images(3, seed=2)
    expected = _pytorch_captions(model, processor, images, num_beams=3)
    assert ONNXCaptioner(folder)(images, num_beams=3, max_new_tokens=10) == expected


def test_the_decoder_stores_the_tied_embedding_table_once(exported):
    import onnx

    model, folder = exported
    vocab, width = model.get_input_embeddings().weight.shape
    graph = onnx.load(str(folder / "onnx" / "decoder_model_merged.onnx")).graph
    tables = [init.name for init in graph.initializer if sorted(init.dims) == sorted([vocab, width])]
    assert len(tables) == 1, tables  # the LM head's transpose is a Transpose node over it, not a second copy


def test_int8_graphs_are_smaller_and_caption(exported):
    _, folder = exported
    for name in ("encoder_model", "decoder_model_merged"):
        fp32 = (folder / "onnx" / f"{name}.onnx").stat().st_size
        int8 = (folder / "onnx" / f"{name}_int8.onnx").read_bytes()
        assert len(int8) < fp32 * 0.8
        assert (folder / "onnx" / f"{name}_quantized.onnx").read_bytes() == int8  # transformers.js's q8 name
    captions = ONNXCaptioner(folder, dtype="int8")(random_images(2), num_beams=2, max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)


def test_cross_attention_export_is_laid_out_for_transformers_js(exported):
    model, folder = exported
    if model.config.fusion != "cross_attention":
        pytest.skip("transformers.js's vision-encoder-decoder layout is the cross-attention model's")
    import onnxruntime as ort

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vision-encoder-decoder" and config["is_encoder_decoder"] is True
    decoder = config["decoder"]
    # TrOCR's names: what makes transformers.js name the cross keys and values as a cache (`getNormalizedConfig`).
    assert decoder["model_type"] == "trocr" and decoder["add_cross_attention"] is True
    assert (decoder["decoder_layers"], decoder["decoder_attention_heads"], decoder["d_model"]) == (2, 4, 32)
    assert (decoder["n_layer"], decoder["n_head"], decoder["n_embd"]) == (2, 4, 32)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == generation["eos_token_id"] == 50256
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == "ViTImageProcessor"

    encoder = ort.InferenceSession(str(folder / "onnx" / "encoder_model.onnx"))
    assert [i.name for i in encoder.get_inputs()] == ["pixel_values"]
    assert [o.name for o in encoder.get_outputs()] == ["last_hidden_state"]
    decoder_session = ort.InferenceSession(str(folder / "onnx" / "decoder_model_merged.onnx"))
    inputs = {i.name: i.shape for i in decoder_session.get_inputs()}
    past = [f"past_key_values.{i}.{part}.{kind}" for i in range(2) for part in ("decoder", "encoder")
            for kind in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "encoder_hidden_states", *past]
    # transformers.js builds the first step's empty past from these shapes: `batch_size` filled in, other names 0.
    assert inputs["past_key_values.0.decoder.key"] == ["batch_size", 4, "past_sequence_length", 8]
    assert inputs["past_key_values.1.encoder.value"] == ["batch_size", 4, "encoder_sequence_length_past", 8]
    outputs = [o.name for o in decoder_session.get_outputs()]
    assert outputs == ["logits", *[name.replace("past_key_values", "present") for name in past]]


def test_cli_exports_fp16_and_int8(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "onnx-repo"
    assert cli.main(["export-onnx", "--model", str(tiny_model_dir), "--output-dir", str(out), "--dtype", "fp16",
                     "--quantize", "int8"]) == 0
    names = sorted(path.name for path in (out / "onnx").iterdir())
    assert names == sorted(f"{part}{suffix}.onnx" for part in ("encoder_model", "decoder_model_merged")
                           for suffix in ("", "_fp16", "_int8", "_quantized"))
    printed = capsys.readouterr()
    assert "decoder_model_merged_fp16.onnx" in printed.out
    assert "exporting: 100%" in printed.err and "6/6" in printed.err  # the progress bar over the six graphs
    fp16 = (out / "onnx" / "decoder_model_merged_fp16.onnx").stat().st_size
    assert fp16 < (out / "onnx" / "decoder_model_merged.onnx").stat().st_size * 0.6
    captions = ONNXCaptioner(out, dtype="fp16")(random_images(2), num_beams=1, max_new_tokens=6)
    assert len(captions) == 2


def test_non_empty_output_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert cli.main(["export-onnx", str(tiny_model_dir), str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "is not empty" in error and "--overwrite" in error
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_too_old_opset_is_refused(processor, tmp_path):
    with pytest.raises(ONNXExportError, match="opset 14 or newer"):
        export_onnx(tiny_model(fusion="cross_attention"), processor, tmp_path / "out", opset=9)


def test_opset_the_exporter_cannot_write_is_a_clear_error(processor, tmp_path):
    with pytest.raises(ONNXExportError, match=r"could not export VisionGPTEncoderForExport at opset 99"):
        export_onnx(tiny_model(fusion="cross_attention"), processor, tmp_path / "out", opset=99)


def test_missing_onnxruntime_names_the_extra(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import importlib

    real_import = importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    assert cli.main(["export-onnx", str(tiny_model_dir), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "onnxruntime" in error and "vision-gpt[onnx]" in error
    with pytest.raises(ImportError, match=r"vision-gpt\[onnx\]"):
        onnx_export.require_onnx("onnx", "onnxruntime")


# ----- what `vision-gpt caption` and `vision-gpt app` use: several captions, scores, sampling ---------------------------


def test_several_beam_captions_and_their_scores_equal_pytorchs(exported, processor):
    model, folder = exported
    pixel_values = processor(images=random_images(2, seed=3))["pixel_values"]
    settings = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8)
    expected = model.generate(pixel_values=pixel_values, **settings, use_packed_linears=False,
                              return_dict_in_generate=True, output_scores=True)
    got = ONNXCaptioner(folder).generate(pixel_values, **settings, return_dict_in_generate=True)
    assert isinstance(got.sequences, torch.Tensor)  # a torch input gets torch outputs, as from `generate`
    assert processor.batch_decode(got.sequences) == processor.batch_decode(expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)


def test_greedy_scores_are_the_average_token_log_prob(exported, processor):
    from vision_gpt.inference.generation import average_log_probs

    model, folder = exported
    pixel_values = processor(images=random_images(2, seed=4))["pixel_values"]
    expected = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=8, use_packed_linears=False,
                              return_dict_in_generate=True, output_logits=True)
    got = ONNXCaptioner(folder).generate(pixel_values, num_beams=1, max_new_tokens=8, return_dict_in_generate=True)
    torch.testing.assert_close(got.sequences_scores, average_log_probs(expected, [model.config.eos_token_id]),
                               atol=1e-4, rtol=0)


def test_sampling_repeats_under_a_seed_and_top_k_1_is_greedy(exported, processor):
    _, folder = exported
    captioner = ONNXCaptioner(folder)
    pixel_values = processor(images=random_images(2, seed=5))["pixel_values"]
    sample = dict(do_sample=True, temperature=1.5, top_p=0.95, num_return_sequences=4, max_new_tokens=6)
    torch.manual_seed(0)
    first = captioner.generate(pixel_values, **sample)
    torch.manual_seed(0)
    assert torch.equal(captioner.generate(pixel_values, **sample), first)
    assert first.shape[0] == 8 and len(set(processor.batch_decode(first))) > 1  # 4 draws each, not all alike
    greedy = captioner.generate(pixel_values, num_beams=1, max_new_tokens=6)
    assert torch.equal(captioner.generate(pixel_values, do_sample=True, top_k=1, max_new_tokens=6), greedy)


def test_caption_scores_equal_pytorchs(exported, processor):
    model, folder = exported
    captioner = ONNXCaptioner(folder)
    images = random_images(3, seed=8)
    batch = processor(images=images, suffix=["a dog runs", "two red squares on grass", "a"])
    theirs = model.score_captions(**batch, use_packed_linears=False)
    ours = captioner.score_captions(**batch)
    for name in ("confidence", "grounding", "log_prob", "log_prob_without_image"):
        torch.testing.assert_close(getattr(ours, name).float(), getattr(theirs, name).float(), atol=1e-4, rtol=1e-4)
    assert ours.num_tokens.tolist() == theirs.num_tokens.tolist()
    # generate's scores of its own captions: the same two passes over its sequences.
    pixel_values = processor(images=images)["pixel_values"]
    output = captioner.generate(pixel_values, num_beams=2, num_return_sequences=2, max_new_tokens=5,
                                output_caption_scores=True)
    expected = model.generate(pixel_values=pixel_values, num_beams=2, num_return_sequences=2, max_new_tokens=5,
                              use_packed_linears=False, output_caption_scores=True)
    assert torch.equal(output.sequences, expected.sequences)
    torch.testing.assert_close(output.caption_scores.grounding.float(), expected.caption_scores.grounding.float(),
                               atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def cross_attention_export(tmp_path_factory, processor):
    """A saved PyTorch model and its export (fp32 and int8), for the commands, which load folders."""
    model = tiny_model(fusion="cross_attention")
    saved = tmp_path_factory.mktemp("torch-model")
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    exported = tmp_path_factory.mktemp("onnx-model")
    export_onnx(model, processor, exported, quantize="int8", overwrite=True)
    return saved, exported


def test_caption_command_with_the_onnx_runtime_writes_the_same_rows(cross_attention_export, tmp_path, capsys):
    saved, exported = cross_attention_export
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(random_images(3, seed=6)):
        image.save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    rows = {}
    for runtime, model in (("torch", saved), ("onnx", exported)):
        output = tmp_path / f"{runtime}.jsonl"
        code = cli.main(["caption", str(folder), "--model", str(model), "--runtime", runtime, "--output", str(output),
                         "--max-new-tokens", "6", "--num-captions", "2"])
        assert code == 1  # the broken file
        rows[runtime] = {row["image"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert {key: row["captions"] for key, row in rows["onnx"].items()} == {
        key: row["captions"] for key, row in rows["torch"].items()}
    assert {row["dtype"] for row in rows["onnx"].values()} == {"onnx-fp32"}
    for key, row in rows["onnx"].items():  # the trust scores too
        if not row["error"]:
            assert row["confidences"] == pytest.approx(rows["torch"][key]["confidences"], abs=1e-4)
            assert row["groundings"] == pytest.approx(rows["torch"][key]["groundings"], abs=1e-4)
    assert "not an image" in rows["onnx"][str(folder / "broken.png")]["error"]
    output = tmp_path / "int8.jsonl"
    assert cli.main(["caption", str(folder / "0.png"), "--model", str(exported), "--runtime", "onnx", "--dtype", "int8",
                     "--output", str(output)]) == 0
    assert json.loads(output.read_text())["dtype"] == "onnx-int8"


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "int8"], "dtype int8 is a quantized ONNX export's: use runtime onnx (--runtime onnx)"),
    (["--runtime", "onnx", "--dtype", "bf16"], "dtype bf16 is not one of an ONNX export's"),
    (["--runtime", "onnx", "--device", "cuda"], "ONNX Runtime's CPU provider"),
])
def test_caption_command_refuses_settings_the_runtime_has_no_graphs_for(cross_attention_export, flags, message,
                                                                         capsys):
    _, exported = cross_attention_export
    assert cli.main(["caption", "x.png", "--model", str(exported), *flags]) == 2
    assert message in capsys.readouterr().err


def test_app_captioner_with_the_onnx_runtime_captions_and_scores_like_pytorch(cross_attention_export):
    pytest.importorskip("gradio", reason="the app needs the app extra: pip install 'vision-gpt[app]'")
    from vision_gpt.app.server import Captioner, DecodingSettings

    saved, exported = cross_attention_export
    images = random_images(2, seed=7)
    settings = DecodingSettings(num_beams=3, num_captions=2, max_new_tokens=6)
    onnx = Captioner.from_pretrained(str(exported), runtime="onnx")
    expected = Captioner.from_pretrained(str(saved)).caption(images, settings)
    got = onnx.caption(images, settings)
    assert [[c.text for c in row] for row in got] == [[c.text for c in row] for row in expected]
    for got_row, expected_row in zip(got, expected):
        assert [round(c.score, 3) for c in got_row] == pytest.approx([c.score for c in expected_row], abs=1e-3)
    greedy = onnx.caption(images, DecodingSettings(num_beams=1, num_captions=1, max_new_tokens=6))
    assert all(len(row) == 1 and row[0].score < 0 for row in greedy)
    with pytest.raises(ValueError, match="dtype bfloat16 is not one of an ONNX export.s"):
        Captioner.from_pretrained(str(exported), runtime="onnx", dtype="bfloat16")
