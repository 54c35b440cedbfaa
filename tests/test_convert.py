"""Converting a ViT + GPT-2 VisionEncoderDecoder (the nlpconnect/vit-gpt2 layout) into VisionGPT, on tiny random
models: same logits, same greedy and beam ids, same default generation, and a saved repo that reloads."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoProcessor,
    BertConfig,
    DeiTConfig,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTImageProcessorPil,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from vision_gpt.export.convert import check_parity, convert_checkpoint, convert_vision_encoder_decoder

from .conftest import IMAGE_SIZE, random_images

VOCAB, EOS = 99, 98
# The checkpoint's own generation defaults; the converted model must reproduce them with no arguments.
VED_GENERATION = dict(max_length=12, num_beams=3, early_stopping=True, no_repeat_ngram_size=2, length_penalty=0.8)


def tiny_ved(n_embd=32, vocab_size=VOCAB, eos=EOS, start=EOS, seed=0, decoder_type="gpt2"):
    """A random ViT + GPT-2 VisionEncoderDecoder; n_embd != 32 gives it an `enc_to_dec_proj`."""
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        image_size=IMAGE_SIZE, patch_size=8)
    if decoder_type == "gpt2":
        # A large init spread makes the decoder's choices depend on the image, so equality checks can fail.
        decoder = GPT2Config(n_embd=n_embd, n_layer=2, n_head=4, n_positions=64, vocab_size=vocab_size,
                             bos_token_id=eos, eos_token_id=eos, add_cross_attention=True, is_decoder=True,
                             initializer_range=0.3)
    else:
        decoder = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             vocab_size=vocab_size, add_cross_attention=True, is_decoder=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = start, eos, eos
    torch.manual_seed(seed)
    ved = VisionEncoderDecoderModel(config).eval()
    ved.generation_config.update(decoder_start_token_id=start, eos_token_id=eos, pad_token_id=eos, **VED_GENERATION)
    return ved


def pixels(batch=3, seed=0):
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[32, 48], ids=["identity", "enc_to_dec_proj"])
def converted(request):
    ved = tiny_ved(n_embd=request.param)
    model, processor = convert_vision_encoder_decoder(ved)
    assert processor is None
    return ved, model


def test_projector_follows_enc_to_dec_proj(converted):
    ved, model = converted
    has_proj = hasattr(ved, "enc_to_dec_proj")
    assert model.config.projector_type == ("linear" if has_proj else "identity")
    assert model.config.fusion == "cross_attention" and model.config.visual_tokens == "patches"
    if has_proj:
        torch.testing.assert_close(model.projector.proj.weight, ved.enc_to_dec_proj.weight, rtol=0, atol=0)


@torch.no_grad()
def test_logits_match(converted):
    ved, model = converted
    pixel_values = pixels()
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    input_ids[:, 0] = EOS
    theirs = ved(pixel_values=pixel_values, decoder_input_ids=input_ids).logits
    ours = model(pixel_values=pixel_values, input_ids=input_ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # The check means something only if the image matters.
    other = ved(pixel_values=pixels(seed=1), decoder_input_ids=input_ids).logits
    assert (other - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_generated_ids_match(converted, num_beams):
    ved, model = converted
    pixel_values = pixels()
    settings = dict(max_new_tokens=10, num_beams=num_beams)
    theirs = ved.generate(pixel_values, **settings)
    ours = model.generate(pixel_values=pixel_values, **settings)
    assert torch.equal(ours, theirs)
    assert len({tuple(row) for row in theirs.tolist()}) > 1, "captions must differ between images"


def test_default_generation_matches(converted):
    ved, model = converted
    pixel_values = pixels(seed=2)
    assert torch.equal(model.generate(pixel_values=pixel_values), ved.generate(pixel_values))
    generation = model.generation_config
    # max_length counts the start token; VisionGPT's saved default counts new tokens.
    assert generation.max_new_tokens == VED_GENERATION["max_length"] - 1
    assert (generation.num_beams, generation.no_repeat_ngram_size, generation.length_penalty) == (3, 2, 0.8)
    assert generation.early_stopping is True


def test_unset_generation_settings_keep_the_ved_defaults():
    ved = tiny_ved()
    ved.generation_config.num_beams = None
    ved.generation_config.max_length = None
    model, _ = convert_vision_encoder_decoder(ved)
    # transformers' defaults (20 new tokens, greedy), not VisionGPT's (32 new tokens, 3 beams).
    assert (model.generation_config.max_new_tokens, model.generation_config.num_beams) == (20, 1)
    pixel_values = pixels(batch=2)
    assert torch.equal(model.generate(pixel_values=pixel_values), ved.generate(pixel_values))


def test_decoder_start_token_other_than_bos_becomes_the_start_token(tokenizer):
    ved = tiny_ved(start=7)
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model, processor = convert_vision_encoder_decoder(ved, tokenizer, image_processor)
    assert model.generation_config.bos_token_id == 7 and model.config.bos_token_id == 7
    # Prompts and training captions start with it too; the caller's tokenizer is left alone.
    assert processor(prompt="a")["input_ids"][0, 0] == 7 and tokenizer.bos_token_id == 50256
    assert model.generation_config.eos_token_id == EOS
    pixel_values = pixels(batch=2)
    ours = model.generate(pixel_values=pixel_values, max_new_tokens=8, num_beams=1)
    assert (ours[:, 0] == 7).all()
    assert torch.equal(ours, ved.generate(pixel_values, max_new_tokens=8, num_beams=1))


def test_untied_lm_head_stays_untied():
    ved = tiny_ved()
    with torch.no_grad():
        head = ved.decoder.lm_head
        head.weight = torch.nn.Parameter(head.weight + 0.1 * torch.randn_like(head.weight))
    model, _ = convert_vision_encoder_decoder(ved)
    assert model.lm_head.weight is not model.language_model.wte.weight
    input_ids = torch.full((2, 3), EOS)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=pixels(2), input_ids=input_ids).logits,
            ved(pixel_values=pixels(2), decoder_input_ids=input_ids).logits, rtol=0, atol=1e-5,
        )


def test_every_source_key_must_be_mapped():
    ved = tiny_ved()
    ved.decoder.register_buffer("stray", torch.zeros(2))
    with pytest.raises(ValueError, match="decoder.stray"):
        convert_vision_encoder_decoder(ved)


def test_wrong_architectures_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="not a VisionEncoderDecoderModel"):
        convert_vision_encoder_decoder(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB)))
    with pytest.raises(ValueError, match="'bert' decoder"):
        convert_vision_encoder_decoder(tiny_ved(decoder_type="bert"))

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_embd=32, n_layer=1, n_head=4).save_pretrained(gpt2)
    with pytest.raises(ValueError, match=f"'{gpt2}' is a 'gpt2' checkpoint, not a VisionEncoderDecoder"):
        convert_checkpoint(str(gpt2), str(tmp_path / "out"))
    # The architecture is read from config.json, before any weights are loaded.
    deit = tmp_path / "deit"
    VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4),
        GPT2Config(add_cross_attention=True, is_decoder=True),
    ).save_pretrained(deit)
    with pytest.raises(ValueError, match=f"'{deit}' has a 'deit' encoder"):
        convert_checkpoint(str(deit), str(tmp_path / "out"))


def test_checkpoint_without_tokenizer_is_refused_by_name(tmp_path):
    tiny_ved().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"Could not load the tokenizer of '{tmp_path}'"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "out"))


@pytest.fixture(scope="module")
def saved_ved(tmp_path_factory, tokenizer):
    """A VED with GPT-2's real vocabulary, tokenizer and a ViT image processor, saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("vit-gpt2")
    ved = tiny_ved(vocab_size=len(tokenizer), eos=tokenizer.eos_token_id, start=tokenizer.eos_token_id)
    ved.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)
    return folder, ved


def test_convert_checkpoint_writes_a_repo_that_captions_like_the_original(saved_ved, tmp_path):
    source, ved = saved_ved
    out = convert_checkpoint(str(source), str(tmp_path / "converted"))
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "vision_gpt"

    images = random_images(3, seed=3)
    inputs = processor(images=images)
    greedy = dict(max_new_tokens=8, num_beams=1)
    theirs = ved.generate(inputs["pixel_values"], **greedy)
    ours = model.generate(**inputs, **greedy)
    assert torch.equal(ours, theirs)
    expected = [caption.strip() for caption in processor.tokenizer.batch_decode(theirs, skip_special_tokens=True)]
    assert processor.batch_decode(ours) == expected
    assert torch.equal(model.generate(**inputs), ved.generate(inputs["pixel_values"]))


def test_converted_repo_has_a_card_that_credits_the_source(saved_ved, tmp_path):
    source, _ = saved_ved
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    ModelCard("---\nlicense: apache-2.0\n---\n# a VED captioner\n").save(copy / "README.md")
    out = convert_checkpoint(str(copy), str(tmp_path / "converted"), repo_id="me/converted")
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"  # the source card's
    assert getattr(card.data, "base_model", None) is None  # a local folder is no Hub model
    assert 'AutoModel.from_pretrained("me/converted", trust_remote_code=True)' in card.text
    assert "greedy ids equal: True" in card.text and (out / "example.jpg").is_file()
    assert convert_checkpoint(str(source), str(tmp_path / "mit"), license="mit").joinpath("README.md").is_file()
    assert ModelCard.load(tmp_path / "mit" / "README.md").data.license == "mit"


def test_convert_checkpoint_fp16_saves_half_precision(saved_ved, tmp_path):
    source, _ = saved_ved
    out = convert_checkpoint(str(source), str(tmp_path / "fp16"), fp16=True)
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}


def test_check_parity_catches_a_wrong_weight(converted):
    ved, model = converted
    assert check_parity(ved, model, pixels(1))["greedy_equal"]
    bias = model.vision_model.layernorm.bias
    original = bias.detach().clone()
    with torch.no_grad():
        bias.add_(0.5)
    try:
        with pytest.raises(RuntimeError, match="logits differ"):
            check_parity(ved, model, pixels(1))
    finally:
        with torch.no_grad():
            bias.copy_(original)
