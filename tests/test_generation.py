import pytest
import torch
from transformers import DynamicCache

from vision_gpt.modeling.compat_vision_gpt import CACHE_NAME

from .conftest import random_images, tiny_model

START = 50256
FUSIONS = ["prefix", "cross_attention"]


def captions(model, processor, images, prompt=None, **kwargs):
    inputs = processor(images=images, prompt=prompt)
    return processor.batch_decode(model.generate(**inputs, **kwargs))


@pytest.fixture(scope="module")
def images():
    return random_images(4, seed=3)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_greedy_beam_and_sampling_shapes(fusion, processor, images):
    model = tiny_model(fusion=fusion)
    pixel_values = processor(images=images[:2])["pixel_values"]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6)
    assert model.generate(pixel_values, num_beams=1, **kwargs).shape == (2, 7)
    assert model.generate(pixel_values, num_beams=3, **kwargs).shape == (2, 7)
    assert model.generate(pixel_values, num_beams=3, num_return_sequences=3, **kwargs).shape == (6, 7)
    sampled = model.generate(pixel_values, do_sample=True, top_k=20, top_p=0.9, temperature=1.3,
                             num_return_sequences=2, num_beams=1, **kwargs)
    assert sampled.shape == (4, 7)
    assert (sampled[:, 0] == START).all()


def test_random_images_get_different_captions(processor, images):
    # Guards the equality tests below: a decoder that ignored its image would pass them trivially.
    assert len(set(captions(tiny_model(), processor, images, max_new_tokens=8, num_beams=1))) > 1


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_captions_equal_single_image_captions(fusion, num_beams, processor, images):
    model = tiny_model(fusion=fusion)
    kwargs = dict(max_new_tokens=8, num_beams=num_beams)
    batched = captions(model, processor, images, **kwargs)
    assert batched == [captions(model, processor, [image], **kwargs)[0] for image in images]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_left_padded_prompts_caption_as_they_do_alone(fusion, processor, images):
    model = tiny_model(fusion=fusion)
    prompts = ["a", "a photo of two", "the", "three small red"]
    batched = captions(model, processor, images, prompt=prompts, max_new_tokens=6, num_beams=1)
    alone = [captions(model, processor, [image], prompt=[p], max_new_tokens=6, num_beams=1)[0]
             for image, p in zip(images, prompts)]
    assert batched == alone
    assert all(caption.startswith(prompt) for caption, prompt in zip(batched, prompts))


def test_sampling_is_reproducible_under_a_seed(processor, images):
    model = tiny_model()
    pixel_values = processor(images=images)["pixel_values"]
    kwargs = dict(do_sample=True, temperature=1.5, max_new_tokens=8, num_beams=1)
    torch.manual_seed(7)
    first = model.generate(pixel_values, **kwargs)
    torch.manual_seed(7)
    again = model.generate(pixel_values, **kwargs)
    torch.manual_seed(8)
    other = model.generate(pixel_values, **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_image_is_encoded_once_per_call(fusion, processor, images):
    model = tiny_model(fusion=fusion)
    seen = []
    model.vision_model.register_forward_hook(lambda module, args, kwargs_out: seen.append(1))
    calls = []
    model.vision_model.register_forward_pre_hook(lambda module, args, kw: calls.append(kw["pixel_values"].shape[0]),
                                                 with_kwargs=True)
    pixel_values = processor(images=images[:2])["pixel_values"]
    model.generate(pixel_values, num_beams=3, num_return_sequences=2, max_new_tokens=5)
    assert calls == [2]


def test_no_repeat_ngram_size_is_honoured(processor, images):
    model = tiny_model()
    pixel_values = processor(images=images)["pixel_values"]
    plain = model.generate(pixel_values, max_new_tokens=12, min_new_tokens=12, num_beams=1)
    controlled = model.generate(pixel_values, max_new_tokens=12, min_new_tokens=12, num_beams=1,
                                no_repeat_ngram_size=2, repetition_penalty=1.3)

    def repeats_a_bigram(row):
        bigrams = list(zip(row[1:-1].tolist(), row[2:].tolist()))
        return len(bigrams) != len(set(bigrams))

    assert any(repeats_a_bigram(row) for row in plain), "the tiny model should repeat itself without controls"
    assert not any(repeats_a_bigram(row) for row in controlled)


def test_default_generation_config_is_set_for_captions():
    config = tiny_model().generation_config
    assert (config.max_new_tokens, config.num_beams) == (32, 3)
    assert config.bos_token_id == config.eos_token_id == config.pad_token_id == START


def test_generate_refuses_mismatched_inputs(processor, images):
    model = tiny_model()
    pixel_values = processor(images=images[:2])["pixel_values"]
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        model.generate(pixel_values, input_ids=torch.tensor([[START]]), max_new_tokens=2)


@pytest.mark.parametrize("kwargs", [
    dict(num_beams=1),
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, num_beams=1, num_return_sequences=2, temperature=1.3),
])
def test_shared_prefix_prefill_matches_plain_generation(kwargs, processor, images):
    """The prefix is prefilled once per image and its cache repeated per beam; the result must be what
    GenerationMixin gives when it repeats and recomputes the prefix for every beam."""
    from transformers import GenerationMixin

    model = tiny_model()
    inputs = processor(images=images[:3], prompt=["a", "two red", "the"])
    settings = dict(max_new_tokens=6, min_new_tokens=6, **kwargs)
    torch.manual_seed(0)
    shared = model.generate(**inputs, **settings)
    torch.manual_seed(0)
    image_embeds = model.get_image_features(inputs["pixel_values"]).pooler_output
    plain = GenerationMixin.generate(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     image_embeds=image_embeds, **settings)
    assert torch.equal(shared, plain)


def test_visual_prefix_goes_through_gpt2_once_per_image(processor, images):
    model = tiny_model()
    rows = []
    model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(tuple(args[0].shape[:2])), with_kwargs=True)  # inputs_embeds
    model.generate(**processor(images=images[:2]), num_beams=3, max_new_tokens=3, min_new_tokens=3)
    assert rows[0] == (2, 4)  # two images x four visual tokens, not six beams
    assert rows[1] == (6, 1)  # then one token per beam


def test_image_placeholders_in_prompts_caption_as_prompts_without_them_and_prefill_once(processor, images):
    import copy

    model = tiny_model()  # prefix, 4 visual tokens
    placeholders = copy.copy(processor)
    placeholders.use_image_tokens_of(model.config)
    settings = dict(num_beams=3, max_new_tokens=4, min_new_tokens=4)
    plain = model.generate(**processor(images=images[:2], text=["a", "two red"]), **settings)
    rows = []
    model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(tuple(args[0].shape[:2])), with_kwargs=True)  # inputs_embeds
    inputs = placeholders(images=images[:2], text=["<image>a", "<image>two red"])
    placed = model.generate(**inputs, **settings)
    assert rows[0] == (2, 4)  # the prefix of two images, not six beams: padding sits after the image tokens
    # The ids come back as given, image tokens included; decoded, they are the same captions.
    image_tokens = torch.full((2, 4), model.config.image_token_id)
    assert torch.equal(placed, torch.cat([image_tokens, plain], dim=1))
    assert placeholders.batch_decode(placed) == processor.batch_decode(plain)


def test_cross_attention_generation_continues_from_the_returned_cache_without_the_image(processor, images):
    model = tiny_model(fusion="cross_attention", visual_tokens="patches")
    inputs = processor(images=images[:2], prompt=["a", "two red"])
    settings = dict(num_beams=1, return_dict_in_generate=True, output_scores=True)
    whole = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **settings)
    first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **settings)
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 3), value=1)
    rest = model.generate(input_ids=first.sequences, attention_mask=mask, cache=first[CACHE_NAME], max_new_tokens=2,
                          min_new_tokens=2, **settings)  # no image: the cache keeps its keys and values
    assert torch.equal(rest.sequences, whole.sequences)
    with pytest.raises(ValueError, match="needs the image"):  # a cache that does not hold the image
        model(input_ids=rest.sequences[:, :2], use_cache=True, cache=_plain_cache_with(model, 1))


def _plain_cache_with(model, tokens):
    """A transformers DynamicCache (not the model's own) that already holds `tokens` positions."""
    cache = DynamicCache(config=model.config.text_config)
    text = model.config.text_config
    shape = (2, text.n_head, tokens, text.n_embd // text.n_head)
    for layer in range(text.n_layer):
        cache.update(torch.zeros(shape), torch.zeros(shape), layer)
    return cache


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
def test_without_an_image_gpt2_alone_continues_the_text(fusion, processor):
    model = tiny_model(fusion=fusion, visual_tokens="patches")
    ids = processor.tokenizer(["a dog"], return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, num_beams=1)
    # The same tokens as GPT-2's blocks alone, step by step, with no visual input at all.
    expected = ids
    for _ in range(4):
        logits = model(input_ids=expected, use_cache=False).logits[:, -1]
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


# ----- image tokens in input_ids (fusion="prefix", LLaVA's convention) --------------------------------------------

def _with_image_tokens(model, input_ids, attention_mask):
    """The same text with the image's tokens in front, as `generate` and transformers' VLMs place them."""
    tokens = input_ids.new_full((input_ids.shape[0], model.config.num_prefix_tokens), model.config.image_token_id)
    return torch.cat([tokens, input_ids], 1), torch.cat([torch.ones_like(tokens), attention_mask], 1)


def test_image_tokens_in_input_ids_compute_what_the_prefix_before_the_text_computes(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:2], suffix=["a dog runs", "two cats"])
    legacy = model(**inputs, output_hidden_states=True)
    ids, mask = _with_image_tokens(model, inputs["input_ids"], inputs["attention_mask"])
    ours = model(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=mask, output_hidden_states=True)
    k = model.config.num_prefix_tokens
    assert model.config.image_token_id == model.config.text_config.vocab_size  # outside GPT-2's vocabulary
    assert ours.logits.shape[1] == ids.shape[1] == legacy.hidden_states[-1].shape[1]  # every position of the input
    torch.testing.assert_close(ours.logits[:, k:], legacy.logits, rtol=1e-5, atol=1e-5)
    # inputs_embeds from the model's own embedding, placeholders included, find the same places.
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model(pixel_values=inputs["pixel_values"], inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(from_embeds.logits, ours.logits, rtol=1e-5, atol=1e-5)


def test_generate_returns_the_image_tokens_it_was_given_and_drops_those_it_added(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:2], prompt=["a", "two red"])
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3)
    added = model.generate(**inputs, **settings)
    ids, mask = _with_image_tokens(model, inputs["input_ids"], inputs["attention_mask"])
    given = model.generate(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(given[:, model.config.num_prefix_tokens:], added)
    assert (given[:, : model.config.num_prefix_tokens] == model.config.image_token_id).all()
    assert processor.batch_decode(added)[1].startswith("two red")


@pytest.mark.parametrize("settings", [
    dict(output_hidden_states=True, return_dict_in_generate=True),  # reads every prompt position: GenerationMixin's path
    dict(output_attentions=True, return_dict_in_generate=True),
])
def test_decoding_that_reads_every_position_gives_the_same_captions(settings, processor, images):
    model = tiny_model()
    model.set_attn_implementation("eager")  # the implementation that returns attention weights
    inputs = processor(images=images[:3])
    greedy = dict(max_new_tokens=5, min_new_tokens=5, num_beams=1)
    fast = model.generate(**inputs, **greedy)
    out = model.generate(**inputs, **greedy, **settings)
    assert torch.equal(out.sequences, fast)
    states = out.hidden_states or out.attentions
    assert states[0][-1].shape[-2] == model.config.num_prefix_tokens + 1  # the first step saw image + start token


def test_prefix_generation_continues_from_the_returned_cache_without_the_image(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:2], prompt=["a", "two red"])
    settings = dict(num_beams=1, return_dict_in_generate=True)
    whole = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **settings)
    first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **settings)
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 3), value=1)
    rest = model.generate(input_ids=first.sequences, attention_mask=mask, cache=first[CACHE_NAME], max_new_tokens=2,
                          min_new_tokens=2, **settings)  # the cache holds the visual prefix
    assert torch.equal(rest.sequences, whole.sequences)


def test_image_tokens_that_do_not_fit_the_image_are_refused(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:2], suffix=["a dog", "a cat"])
    ids, mask = _with_image_tokens(model, inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(ValueError, match="hold image tokens .* but no image"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"hold 7 image tokens .* 2 images give 8 visual tokens \(4 each\)"):
        model(pixel_values=inputs["pixel_values"], input_ids=torch.cat([ids[:1, 1:], ids[1:, :-1]]),
              attention_mask=mask[:, 1:])


def test_repetition_penalty_with_image_tokens_generate_reads_works_or_says_why(processor, images):
    # transformers before 5.24 indexes the scores by every id in the sequence for repetition_penalty; image tokens lie
    # outside the vocabulary. Where generate reads them (here: hidden states of every position), the release's
    # processor must skip such ids, or generate refuses with a message instead of an IndexError.
    from vision_gpt.modeling.compat_vision_gpt import penalties_skip_ids_outside_vocabulary

    model = tiny_model()
    inputs = processor(images=images[:2])
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=1, repetition_penalty=1.3)
    fast = model.generate(**inputs, **settings)  # the prefix in the cache: GenerationMixin reads the text alone
    every_position = dict(output_hidden_states=True, return_dict_in_generate=True)
    if penalties_skip_ids_outside_vocabulary():
        assert torch.equal(model.generate(**inputs, **settings, **every_position).sequences, fast)
    else:
        with pytest.raises(ValueError, match="repetition_penalty with image tokens that generate must read"):
            model.generate(**inputs, **settings, **every_position)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_generation_config_passed_in_is_merged_with_the_models(fusion, processor, images):
    # A GenerationConfig leaves unset fields None: the model's 3 beams still apply, as GenerationMixin applies them.
    from transformers import GenerationConfig

    model = tiny_model(fusion=fusion)
    inputs = processor(images=images[:2])
    given = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=5, min_new_tokens=5))
    assert torch.equal(given, model.generate(**inputs, max_new_tokens=5, min_new_tokens=5))
    static = GenerationConfig(max_new_tokens=5, min_new_tokens=5, cache_implementation="static")
    assert torch.equal(model.generate(**inputs, generation_config=static), given)


def test_prefix_continuation_reads_every_token_appended_to_the_returned_ids(processor, images):
    # The returned cache says it holds the visual prefix, whatever the caller appends (here more tokens than the
    # prefix has positions): continuing equals generating from the whole prompt at once.
    model = tiny_model()
    inputs = processor(images=images[:1], prompt=["a"])
    settings = dict(num_beams=1, return_dict_in_generate=True)
    first = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **settings)
    appended = torch.cat([first.sequences, processor.tokenizer([" red square on blue"], return_tensors="pt",
                                                               add_special_tokens=False).input_ids], dim=1)
    assert appended.shape[1] - first.sequences.shape[1] >= model.config.num_prefix_tokens
    rest = model.generate(input_ids=appended, attention_mask=torch.ones_like(appended), cache=first[CACHE_NAME],
                          max_new_tokens=3, min_new_tokens=3, **settings)
    whole = model.generate(pixel_values=inputs["pixel_values"], input_ids=appended,
                           attention_mask=torch.ones_like(appended), max_new_tokens=3, min_new_tokens=3, **settings)
    assert torch.equal(rest.sequences, whole.sequences)


def test_max_length_counts_the_callers_text_on_every_path(processor, images):
    model = tiny_model()
    inputs = processor(images=images[:2])
    fast = model.generate(**inputs, max_length=6, max_new_tokens=None, num_beams=1)
    every = model.generate(**inputs, max_length=6, max_new_tokens=None, num_beams=1, output_hidden_states=True,
                           return_dict_in_generate=True)
    assert fast.shape[1] == 6 and torch.equal(every.sequences, fast)


def test_labels_that_copy_input_ids_ignore_the_image_tokens(processor, images):
    model = tiny_model()
    batch = processor(images=images[:2], suffix=["a dog", "two cats run"])
    ids, mask = _with_image_tokens(model, batch["input_ids"], batch["attention_mask"])
    labels = torch.cat([ids[:, : model.config.num_prefix_tokens], batch["labels"]], dim=1)  # image ids kept as labels
    ours = model(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask, labels=labels).loss
    legacy = model(**batch).loss  # the same captions, the image before the text
    torch.testing.assert_close(ours, legacy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_stop_strings_end_a_caption_where_the_string_appears(fusion, processor):
    # generate's `tokenizer` (which stop_strings needs) never reaches the model's forward.
    model = tiny_model(fusion=fusion)
    inputs = processor(images=random_images(2, seed=31))
    free = processor.batch_decode(model.generate(**inputs, max_new_tokens=8, num_beams=1))[0]
    stop = free[: len(free) // 2][-3:]  # ends in the caption's first half
    stopped = model.generate(**inputs, max_new_tokens=8, num_beams=1, stop_strings=[stop], tokenizer=processor.tokenizer)
    text = processor.batch_decode(stopped)[0]
    assert stop in text and free.startswith(text) and len(text) < len(free)
