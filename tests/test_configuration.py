import pytest
from transformers import AutoConfig, CLIPConfig, GPT2Config, ViTConfig

from vision_gpt import VisionGPTConfig

from .conftest import tiny_config, tiny_text_config, tiny_vision_config


def test_defaults_are_vit_b16_and_gpt2_small_with_cross_attention_over_all_patches():
    config = VisionGPTConfig()
    assert isinstance(config.vision_config, ViTConfig)
    assert (config.vision_config.hidden_size, config.vision_config.patch_size, config.vision_config.image_size) == (
        768, 16, 224)
    assert isinstance(config.text_config, GPT2Config) and config.text_config.n_layer == 12
    assert (config.fusion, config.visual_tokens, config.num_prefix_tokens) == ("cross_attention", "patches", 0)
    assert config.num_image_tokens == 197 and config.text_config.add_cross_attention is True
    assert config.pad_token_id == config.eos_token_id == 50256


def test_round_trip_through_dict_and_disk(tmp_path):
    config = tiny_config(fusion="cross_attention", visual_tokens="patches", freeze_text=False, freeze_text_layers=1,
                         projector_type="linear", vision_feature_layer=-2)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VisionGPTConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.text_config.add_cross_attention is True
    assert VisionGPTConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_sub_configs_accept_objects_and_dicts():
    from_objects = VisionGPTConfig(vision_config=ViTConfig(**{k: v for k, v in tiny_vision_config().items()
                                                             if k != "model_type"}),
                                   text_config=GPT2Config(**{k: v for k, v in tiny_text_config().items()
                                                             if k != "model_type"}))
    from_dicts = VisionGPTConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config())
    assert from_objects.to_dict() == from_dicts.to_dict()


@pytest.mark.parametrize("tower, tokens", [("vit", 17), ("clip_vision_model", 17), ("siglip_vision_model", 16),
                                           ("dinov2", 17)])
def test_other_towers_are_accepted_and_count_their_tokens(tower, tokens):
    config = tiny_config(tower, visual_tokens="patches")
    assert config.vision_config.model_type == tower
    assert config.num_image_tokens == config.num_prefix_tokens == tokens


@pytest.mark.parametrize("tower", ["vit", "siglip_vision_model"])
@pytest.mark.parametrize("merge_size, tokens", [(1, 16), (2, 4), (3, 4), (4, 1)])
def test_merged_patches_count_blocks_of_the_grid_without_cls(tower, merge_size, tokens):
    # The tiny towers have a 4x4 patch grid; 3x3 blocks cover it once its last row and column are repeated.
    config = tiny_config(tower, visual_tokens="merged", patch_merge_size=merge_size)
    assert config.patch_grid_size == 4
    assert config.num_image_tokens == config.num_prefix_tokens == tokens


def test_vit_b16_merged_in_blocks_of_two_gives_49_tokens():
    assert VisionGPTConfig(visual_tokens="merged").num_image_tokens == 49


def test_cross_attention_has_no_prefix_and_sets_gpt2_flag():
    config = tiny_config(fusion="cross_attention")
    assert config.num_prefix_tokens == 0 and config.num_image_tokens == 4
    assert config.text_config.add_cross_attention is True
    assert tiny_config().text_config.add_cross_attention is False


def test_saved_config_declares_auto_classes_and_both_pipelines():
    config = tiny_config().to_dict()
    assert config["auto_map"]["AutoModel"] == "modeling_vision_gpt.VisionGPTForConditionalGeneration"
    assert config["auto_map"]["AutoModelForImageTextToText"] == config["auto_map"]["AutoModel"]
    assert config["auto_map"]["AutoProcessor"] == "processing_vision_gpt.VisionGPTProcessor"
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_vision_gpt.VisionGPTImageToTextPipeline"
    assert config["custom_pipelines"]["image-text-to-text"]["impl"] == (
        "pipeline_vision_gpt.VisionGPTImageTextToTextPipeline")
    # A loaded config keeps what it declares: a repo saved before a pipeline existed has no file that defines it.
    older = {**config, "custom_pipelines": {"image-to-text": config["custom_pipelines"]["image-to-text"]}}
    assert set(VisionGPTConfig.from_dict(older).custom_pipelines) == {"image-to-text"}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(fusion="concat"), "fusion"),
        (dict(visual_tokens="cls"), "visual_tokens"),
        (dict(projector_type="conv"), "projector_type"),
        (dict(num_visual_tokens=0), "num_visual_tokens"),
        (dict(num_visual_tokens=2.5), "num_visual_tokens"),
        (dict(num_visual_tokens=96), "num_visual_tokens"),
        (dict(projector_hidden_size=-1), "projector_hidden_size"),
        (dict(projector_hidden_act="swoosh"), "projector_hidden_act"),
        (dict(freeze_text_layers=3), "freeze_text_layers"),
        (dict(freeze_text_layers=-1), "freeze_text_layers"),
        (dict(freeze_vision="yes"), "freeze_vision"),
        (dict(vision_feature_layer=5), "vision_feature_layer"),
        (dict(vision_feature_layer=[]), "vision_feature_layer"),
        (dict(vision_feature_layer=[0, 5]), "vision_feature_layer"),
        (dict(vision_feature_layer=[True]), "vision_feature_layer"),
        (dict(projector_type="identity", visual_tokens="pooled"), "projector_type"),
        (dict(projector_type="identity", visual_tokens="merged"), "projector_type"),
        (dict(patch_merge_size=0), "patch_merge_size"),
        (dict(patch_merge_size=True), "patch_merge_size"),
        (dict(visual_tokens="merged", patch_merge_size=5), "patch_merge_size"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_identity_projector_needs_equal_hidden_sizes():
    with pytest.raises(ValueError, match="equal hidden sizes"):
        VisionGPTConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(n_embd=64),
                        projector_type="identity")


def test_unsupported_towers_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="vision_config.*bert"):
        VisionGPTConfig(vision_config={"model_type": "bert"})
    with pytest.raises(ValueError, match="CLIPConfig\\(\\).vision_config"):
        VisionGPTConfig(vision_config=CLIPConfig().to_dict())
    with pytest.raises(ValueError, match="text_config.*'vit'; the decoder must be one of"):
        VisionGPTConfig(text_config={"model_type": "vit"})
