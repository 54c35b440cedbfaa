import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel
from transformers.cache_utils import DynamicCache
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from vision_gpt import VisionGPTForConditionalGeneration
from vision_gpt.modeling.compat_vision_gpt import CACHE_NAME
from vision_gpt.modeling.gpt2_vision_gpt import VisionGPTTextModel, load_gpt2_state_dict

from .conftest import ALL_MODES, IMAGE_SIZE, tiny_model, tiny_text_config, tiny_vision_config

START = 50256


def batch(batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    # Row 1 is shorter (right padding) and contains GPT-2's token 0 ("!"), a real token.
    input_ids = torch.tensor([[START, 64, 3290, 4539, START], [START, 0, 0, START, START], [START, 5, 6, 7, START]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100
    return pixel_values[:batch_size], input_ids[:batch_size], attention_mask[:batch_size], labels[:batch_size]


@pytest.mark.parametrize("fusion, visual_tokens", ALL_MODES)
def test_every_mode_gives_text_logits_and_a_finite_loss(fusion, visual_tokens):
    model = tiny_model(fusion=fusion, visual_tokens=visual_tokens)
    pixel_values, input_ids, attention_mask, labels = batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (3, 5, 50257)
    assert out.image_embeds.shape == (3, model.config.num_image_tokens, 32)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.projector.proj.fc1.weight.grad is not None if hasattr(model.projector.proj, "fc1") else True


def test_loss_covers_exactly_the_unmasked_caption_tokens_including_token_zero():
    model = tiny_model()
    pixel_values, input_ids, attention_mask, labels = batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    targets = labels[:, 1:]
    keep = targets != -100
    assert (targets[keep] == 0).sum() == 2, "token 0 must be a target, not treated as padding"
    log_probs = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
    expected = -log_probs[keep, targets[keep]].mean()
    torch.testing.assert_close(out.loss, expected)


def test_padding_token_ids_do_not_change_the_loss():
    model = tiny_model()
    pixel_values, input_ids, attention_mask, labels = batch()
    loss = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    other_padding = input_ids.masked_fill(attention_mask == 0, 123)
    loss_other = model(pixel_values=pixel_values, input_ids=other_padding, attention_mask=attention_mask,
                       labels=labels).loss
    torch.testing.assert_close(loss, loss_other)


def test_loss_with_num_items_in_batch_is_a_sum_over_that_count():
    model = tiny_model()
    pixel_values, input_ids, attention_mask, labels = batch()
    mean_loss = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                      labels=labels).loss
    count = int((labels[:, 1:] != -100).sum())
    summed = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                   num_items_in_batch=torch.tensor(2 * count)).loss
    torch.testing.assert_close(summed, mean_loss / 2)


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
def test_kv_cache_steps_match_a_full_forward(fusion):
    model = tiny_model(fusion=fusion)
    pixel_values, input_ids, _, _ = batch()
    full = model(pixel_values=pixel_values, input_ids=input_ids).logits
    cache = DynamicCache(config=model.config.text_config)
    # The cache goes by the installed release's name (`cache` since 5.24), both in and out.
    first = model(pixel_values=pixel_values, input_ids=input_ids[:, :3], use_cache=True, **{CACHE_NAME: cache})
    image_embeds = first.image_embeds
    step = model(input_ids=input_ids[:, 3:4], image_embeds=image_embeds, **{CACHE_NAME: first[CACHE_NAME]},
                 attention_mask=torch.ones(3, 4, dtype=torch.long), use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, 3], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(CACHE_NAME == "past_key_values", reason="this transformers release still calls it past_key_values")
def test_the_old_cache_name_still_works_and_warns():
    model = tiny_model()
    pixel_values, input_ids, _, _ = batch()
    cache = DynamicCache(config=model.config.text_config)
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = model(pixel_values=pixel_values, input_ids=input_ids, past_key_values=cache, use_cache=True)
    assert old.cache is cache and cache.get_seq_length() == model.config.num_prefix_tokens + input_ids.shape[1]
    with pytest.raises(ValueError, match="both"):
        model(pixel_values=pixel_values, input_ids=input_ids, past_key_values=cache, cache=cache)


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
def test_eager_attention_returns_the_weights_and_where_caption_tokens_looked(fusion):
    model = tiny_model(fusion=fusion)
    pixel_values, input_ids, attention_mask, _ = batch()
    sdpa_logits = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
    logger = transformers_logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(logger) as captured:
        model.set_attn_implementation("eager")
    assert "does not support setting its attention implementation" not in captured.out
    assert model.language_model.config._attn_implementation == "eager"
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    # Same model, other kernel: they round differently, and the tiny model's visual tokens (values in the thousands)
    # make large cross-attention scores that amplify it: 8.2e-4 at most on logits up to 8.4 on an AMD EPYC (AVX-512, no
    # AMX), under 1e-4 on an Intel Xeon with AMX. A wrong kernel differs by orders of magnitude more.
    torch.testing.assert_close(out.logits, sdpa_logits, rtol=1e-4, atol=2e-3)
    layers, heads = model.config.text_config.n_layer, model.config.text_config.n_head
    visual = model.config.num_image_tokens if fusion == "prefix" else 0
    text_len = input_ids.shape[1]
    assert len(out.attentions) == layers
    assert out.attentions[0].shape == (3, heads, visual + text_len, visual + text_len)
    if fusion == "prefix":
        assert not out.cross_attentions
        return
    assert len(out.cross_attentions) == layers
    weights = out.cross_attentions[-1]  # (B, H, T, num_image_tokens)
    assert weights.shape == (3, heads, text_len, model.config.num_image_tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, heads, text_len))
    assert not torch.allclose(weights[0], weights[1])  # each image's own tokens


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
def test_left_padded_prompt_gives_the_logits_of_the_unpadded_prompt(fusion):
    model = tiny_model(fusion=fusion)
    pixel_values = batch()[0][:1]
    alone = model(pixel_values=pixel_values, input_ids=torch.tensor([[START, 64]])).logits[:, -1]
    padded = model(pixel_values=pixel_values, input_ids=torch.tensor([[START, START, START, 64]]),
                   attention_mask=torch.tensor([[0, 0, 1, 1]])).logits[:, -1]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_vision_features_and_image_embeds_are_alternatives_to_pixels():
    model = tiny_model()
    pixel_values, input_ids, attention_mask, _ = batch()
    from_pixels = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
    features = model.get_vision_features(pixel_values)
    assert features.shape == (3, 17, 32)
    from_features = model(vision_features=features, input_ids=input_ids, attention_mask=attention_mask).logits
    embeds = model.get_image_features(pixel_values).pooler_output
    from_embeds = model(image_embeds=embeds, input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(from_features, from_pixels)
    torch.testing.assert_close(from_embeds, from_pixels)


def test_pooled_mode_reads_one_feature_per_image():
    model = tiny_model(visual_tokens="pooled", num_visual_tokens=3)
    features = model.get_vision_features(batch()[0])
    assert features.shape == (3, 1, 32)
    assert model.get_image_features(vision_features=features).pooler_output.shape == (3, 3, 32)


def test_vision_feature_layer_selects_an_earlier_layer():
    model = tiny_model(vision_feature_layer=1)
    pixel_values = batch()[0]
    hidden = model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(model.get_vision_features(pixel_values), hidden)


@pytest.mark.parametrize("visual_tokens", ["patches", "merged", "queries"])
def test_several_feature_layers_are_concatenated_as_llava_does(visual_tokens):
    model = tiny_model(vision_feature_layer=[0, -1], visual_tokens=visual_tokens)
    pixel_values, input_ids, attention_mask, labels = batch()
    hidden = model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    features = model.get_vision_features(pixel_values)  # (B, N, 2 Dv): the embeddings' output, then the last layer's
    torch.testing.assert_close(features, torch.cat([hidden[0], hidden[-1]], dim=-1))
    assert model.config.vision_feature_size == 2 * model.config.vision_config.hidden_size
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.isfinite(out.loss) and out.image_embeds.shape[1] == model.config.num_image_tokens
    assert model.generate(pixel_values=pixel_values, max_new_tokens=3, num_beams=1).shape[0] == 3


def test_one_layer_from_the_command_line_stays_the_towers_output():
    # Flags give a list; one layer is the int that means "after the final norm" for -1, not hidden_states[-1].
    from vision_gpt.assembly.build import model_overrides
    from vision_gpt.training.arguments import ModelArguments

    assert model_overrides(ModelArguments())["vision_feature_layer"] == -1
    assert model_overrides(ModelArguments(vision_feature_layer=[4, -1]))["vision_feature_layer"] == [4, -1]


@pytest.mark.parametrize("tower", ["clip_vision_model", "siglip_vision_model", "dinov2"])
@pytest.mark.parametrize("visual_tokens", ["patches", "pooled"])
def test_other_towers_train_and_generate(tower, visual_tokens):
    model = tiny_model(tower, visual_tokens=visual_tokens)
    pixel_values, input_ids, attention_mask, labels = batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.isfinite(out.loss)
    assert out.image_embeds.shape[1] == model.config.num_image_tokens
    assert model.generate(pixel_values=pixel_values, max_new_tokens=3, num_beams=1).shape[0] == 3


def test_errors_name_what_is_missing():
    model = tiny_model()
    pixel_values, input_ids, _, labels = batch()
    with pytest.raises(ValueError, match="input_ids"):
        model(pixel_values=pixel_values)
    with pytest.raises(ValueError, match="labels` were given without an image"):
        model(input_ids=input_ids, labels=labels)
    with pytest.raises(ValueError, match="3 images for 2"):
        model(pixel_values=pixel_values, input_ids=input_ids[:2])
    with pytest.raises(ValueError, match="labels"):
        model(pixel_values=pixel_values, input_ids=input_ids, labels=labels[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones(3, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="labels` were given without an image"):
        tiny_model(fusion="cross_attention")(input_ids=input_ids, labels=labels)


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_default_freezing_trains_only_the_projector():
    model = tiny_model()
    assert trainable_names(model) and all(name.startswith("model.projector.") for name in trainable_names(model))
    summary = model.parameter_summary()
    assert summary["vision_model"]["trainable"] == summary["language_model"]["trainable"] == 0
    assert summary["projector"]["trainable"] == summary["projector"]["total"] > 0
    assert summary["total"]["total"] == model.num_parameters()
    assert summary["total"]["trainable"] == model.num_parameters(only_trainable=True)


def test_cross_attention_layers_stay_trainable_with_gpt2_frozen():
    names = trainable_names(tiny_model(fusion="cross_attention"))
    assert any(".crossattention." in name for name in names)
    assert any(".ln_cross_attn." in name for name in names)
    gpt2_names = {name for name in names if name.startswith("model.language_model.")}
    assert gpt2_names and all(".crossattention." in name or ".ln_cross_attn." in name for name in gpt2_names)


def test_first_n_gpt2_layers_can_be_frozen():
    names = trainable_names(tiny_model(freeze_text=False, freeze_text_layers=1))
    assert not any(".h.0." in name for name in names)
    assert any(".h.1." in name for name in names)
    assert any("language_model.wte" in name for name in names)


def test_set_frozen_changes_what_trains_and_refuses_bad_values():
    model = tiny_model()
    before = model.parameter_summary()["total"]["trainable"]
    model.set_frozen(text=False)
    after_text = model.parameter_summary()["total"]["trainable"]
    model.set_frozen(vision=False)
    after_all = model.parameter_summary()["total"]["trainable"]
    assert before < after_text < after_all == model.num_parameters()
    with pytest.raises(ValueError, match="freeze_text_layers"):
        model.set_frozen(text_layers=7)
    assert model.config.freeze_text_layers == 0


def test_frozen_parameters_get_no_gradient():
    model = tiny_model(freeze_text=False, freeze_text_layers=1).train()
    pixel_values, input_ids, attention_mask, labels = batch()
    model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_model(freeze_text=False, freeze_vision=False).train()
        model.config.text_config.attn_pdrop = model.config.text_config.resid_pdrop = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            # transformers 5.23 renamed gradient_checkpointing_enable (the old name warns): whichever it has.
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        pixel_values, input_ids, attention_mask, labels = batch()
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
              labels=labels).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_our_gpt2_computes_transformers_gpt2():
    # vision-gpt's own GPT-2 (gpt2_vision_gpt.py) with GPT-2's weights gives GPT-2's logits, with a left-padded batch.
    torch.manual_seed(2)
    gpt2 = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in tiny_text_config().items() if k != "model_type"})).eval()
    ours = VisionGPTTextModel(gpt2.config).eval()
    head = torch.nn.Linear(gpt2.config.n_embd, gpt2.config.vocab_size, bias=False)
    load_gpt2_state_dict(ours, head, gpt2.state_dict())
    input_ids = torch.randint(0, 500, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = gpt2(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        hidden = ours(ours.get_input_embeddings()(input_ids), positions, mask)[0]
        logits = head(hidden)
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_the_gpt2_key_map_refuses_a_state_dict_that_does_not_fit():
    config = GPT2Config(**{k: v for k, v in tiny_text_config().items() if k != "model_type"})
    ours, head = VisionGPTTextModel(config), torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
    weights = GPT2LMHeadModel(config).state_dict()
    with pytest.raises(ValueError, match="missing.*h.1.mlp.c_fc.weight"):
        load_gpt2_state_dict(ours, head, {k: v for k, v in weights.items() if k != "transformer.h.1.mlp.c_fc.weight"})
    with pytest.raises(ValueError, match="unexpected.*score.weight"):
        load_gpt2_state_dict(ours, head, {**weights, "score.weight": weights["lm_head.weight"]})
    with pytest.raises(ValueError, match="has shape"):
        load_gpt2_state_dict(ours, head, {**weights, "transformer.wpe.weight": weights["transformer.wpe.weight"][:10]})


def test_from_vision_text_pretrained_loads_both_towers(tmp_path):
    torch.manual_seed(1)
    vit = ViTModel(ViTConfig(**{k: v for k, v in tiny_vision_config().items() if k != "model_type"}),
                   add_pooling_layer=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in tiny_text_config().items() if k != "model_type"}))
    vit.save_pretrained(tmp_path / "vit")
    gpt2.save_pretrained(tmp_path / "gpt2")
    model = VisionGPTForConditionalGeneration.from_vision_text_pretrained(
        str(tmp_path / "vit"), str(tmp_path / "gpt2"), fusion="cross_attention", num_visual_tokens=5)
    assert model.config.num_visual_tokens == 5 and model.config.fusion == "cross_attention"
    for name, tensor in vit.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    for name, tensor in gpt2.transformer.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], tensor), name
    assert torch.equal(model.lm_head.weight, gpt2.lm_head.weight)
    assert model.lm_head.weight is model.language_model.wte.weight
    assert hasattr(model.language_model.h[0], "crossattention")
    assert all(name.startswith("model.projector.") or ".crossattention." in name or ".ln_cross_attn." in name
               for name in trainable_names(model))


def test_from_vision_text_pretrained_takes_the_vision_part_of_a_full_clip(tmp_path):
    vision = {k: v for k, v in tiny_vision_config("clip_vision_model").items() if k != "model_type"}
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    GPT2LMHeadModel(GPT2Config(**{k: v for k, v in tiny_text_config().items() if k != "model_type"})).save_pretrained(
        tmp_path / "gpt2")
    model = VisionGPTForConditionalGeneration.from_vision_text_pretrained(str(tmp_path / "clip"),
                                                                          str(tmp_path / "gpt2"))
    assert model.config.vision_config.model_type == "clip_vision_model"
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name


def test_merged_tokens_concatenate_neighbouring_patches_and_drop_cls():
    projector = tiny_model(visual_tokens="merged").projector  # a 4x4 grid after CLS, blocks of 2x2
    features = torch.arange(17.0)[None, :, None].expand(2, 17, 3)  # token i has features (i, i, i)
    merged = projector.merge_patches(features)
    assert merged.shape == (2, 4, 12)
    # Block (0, 0) holds patches 1, 2 (first row) and 5, 6 (second row); CLS (token 0) is in no block.
    assert merged[0, 0].tolist() == [1.0] * 3 + [2.0] * 3 + [5.0] * 3 + [6.0] * 3
    assert merged[1, 3].tolist() == [11.0] * 3 + [12.0] * 3 + [15.0] * 3 + [16.0] * 3


def test_merged_tokens_pad_a_grid_the_blocks_do_not_divide():
    model = tiny_model(visual_tokens="merged", patch_merge_size=3)  # 4x4 grid -> 2x2 blocks of 3x3
    features = torch.arange(17.0)[None, :, None].expand(1, 17, 1)
    merged = model.projector.merge_patches(features)
    # The last block repeats the grid's last row and column: patches 16 (corner) fill its missing cells.
    assert merged[0, 3].tolist() == [16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0]
    assert merged[0, 0].tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 9.0, 10.0, 11.0]
    pixel_values, input_ids, attention_mask, labels = batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.image_embeds.shape == (3, 4, 32) and torch.isfinite(out.loss)


def test_merged_tokens_name_a_grid_that_does_not_match():
    projector = tiny_model(visual_tokens="merged").projector
    with pytest.raises(ValueError, match="4x4 patch grid, but got 10 tokens"):
        projector.merge_patches(torch.zeros(1, 10, 32))


@pytest.mark.parametrize("split", [0, 3, 5])  # the ONNX decoder's first step (empty past), a partial past, a full one
def test_cross_attention_over_key_parts_equals_attention_over_the_joined_keys(split):
    from vision_gpt.modeling.gpt2_vision_gpt import VisionGPTAttention

    config = GPT2Config(**{k: v for k, v in tiny_text_config().items() if k != "model_type"})
    torch.manual_seed(0)
    attention = VisionGPTAttention(config, layer_idx=0, is_cross_attention=True).eval()
    hidden = torch.randn(4, 1, config.n_embd)  # 2 images x 2 sequences each, one token
    keys, values = attention.cross_keys_values(torch.randn(2, 5, config.n_embd))  # (2, H, 5, hd)
    with torch.no_grad():
        joined, _ = attention(hidden, cross_keys_values=(keys, values))
        parts, weights = attention(hidden, cross_keys_values=(keys.split([split, 5 - split], dim=2),
                                                              values.split([split, 5 - split], dim=2)))
    torch.testing.assert_close(parts, joined, rtol=1e-5, atol=1e-6)
    assert weights is None
