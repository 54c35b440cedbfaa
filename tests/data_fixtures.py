"""Tiny captioning datasets in every supported layout, and tiny pretrained towers, written by the tests themselves."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def colour_image(name: str, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    array = np.clip(np.array(COLOURS[name])[None, None] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    return Image.fromarray(array.astype(np.uint8))


def samples(count: int, offset: int = 0):
    """(file name, colour, five captions) triples."""
    names = list(COLOURS)
    out = []
    for index in range(offset, offset + count):
        colour = names[index % len(names)]
        captions = [f"A {colour} square .", f"a {colour} picture", f"something {colour}", f"the colour {colour}",
                    f"an image that is {colour}"]
        out.append((f"img_{index:03d}.jpg", colour, captions))
    return out


def write_flickr8k(root: Path, train: int = 8, val: int = 4, test: int = 4) -> Path:
    """The original distribution: Flicker8k_Dataset/, Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt."""
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    lines, offset = [], 0
    for split, count in (("train", train), ("dev", val), ("test", test)):
        split_samples = samples(count, offset)
        offset += count
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(s[0] for s in split_samples) + "\n")
        for name, colour, captions in split_samples:
            colour_image(colour).save(root / "Flicker8k_Dataset" / name)
            lines += [f"{name}#{k}\t{caption}" for k, caption in enumerate(captions)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return root


def write_karpathy(root: Path, train: int = 6, val: int = 2, test: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    entries, offset = [], 0
    for split, count in (("train", train), ("val", val), ("test", test)):
        for name, colour, captions in samples(count, offset):
            colour_image(colour).save(root / "images" / name)
            entries.append({"filename": name, "split": split,
                            "sentences": [{"raw": c, "tokens": c.split()} for c in captions]})
        offset += count
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    return root


def write_coco(root: Path, train: int = 6, val: int = 2) -> Path:
    (root / "annotations").mkdir(parents=True)
    offset = 0
    for split, count in (("train", train), ("val", val)):
        (root / f"{split}2017").mkdir()
        images, annotations = [], []
        for image_id, (name, colour, captions) in enumerate(samples(count, offset)):
            colour_image(colour).save(root / f"{split}2017" / name)
            images.append({"id": image_id, "file_name": name})
            annotations += [{"image_id": image_id, "id": len(annotations), "caption": c} for c in captions]
        offset += count
        (root / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations}))
    return root


def write_datasets(root: Path, numbered_columns: bool = False, train: int = 6, val: int = 2) -> Path:
    import datasets

    splits = {}
    offset = 0
    for split, count in (("train", train), ("validation", val)):
        rows = samples(count, offset)
        offset += count
        data = {"image": [colour_image(colour) for _, colour, _ in rows]}
        if numbered_columns:
            for k in range(5):
                data[f"caption_{k}"] = [captions[k] for _, _, captions in rows]
        else:
            data["captions"] = [captions for _, _, captions in rows]
        splits[split] = datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def write_kaggle_flickr8k(root: Path, count: int = 20) -> Path:
    """Kaggle's Flickr8k copy: Images/ and captions.txt (an image,caption CSV header; captions with commas)."""
    (root / "Images").mkdir(parents=True)
    lines = ["image,caption"]
    for name, colour, captions in samples(count):
        colour_image(colour).save(root / "Images" / name)
        lines += [f"{name},{caption}" for caption in captions[:4]]
        lines.append(f'{name},"a {colour} square, small"')
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def write_imagefolder(root: Path, metadata: str = "jsonl", split_folders: bool = True, train: int = 6,
                      val: int = 2, test: int = 2) -> Path:
    """datasets' ImageFolder: images with a metadata.jsonl (a list of captions per image) or metadata.csv
    (caption_0..caption_4 columns), in train/, validation/ and test/ folders or all in `root` (then one split)."""
    offset = 0
    for split, count in (("train", train), ("validation", val), ("test", test)):
        if not split_folders and split != "train":
            continue
        folder = root / split if split_folders else root
        folder.mkdir(parents=True, exist_ok=True)
        rows = samples(count if split_folders else train + val + test, offset)
        offset += count
        for name, colour, _ in rows:
            colour_image(colour).save(folder / name)
        if metadata == "jsonl":
            text = "".join(json.dumps({"file_name": name, "captions": captions}) + "\n" for name, _, captions in rows)
        else:
            text = "file_name," + ",".join(f"caption_{k}" for k in range(5)) + "\n"
            text += "".join(f"{name}," + ",".join(captions) + "\n" for name, _, captions in rows)
        (folder / f"metadata.{metadata}").write_text(text)
    return root


def save_tiny_towers(root: Path, tokenizer) -> tuple[str, str]:
    """A tiny ViT (no pooler) and a tiny GPT-2 with GPT-2's tokenizer, saved as pretrained checkpoints."""
    import torch

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             image_size=32, patch_size=8), add_pooling_layer=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=96))
    vit.save_pretrained(root / "vit")
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    return str(root / "vit"), str(root / "gpt2")


def save_tiny_bert(folder: Path, words: list[str], num_layers: int = 3) -> Path:
    """A tiny random BERT and a word-level WordPiece tokenizer over `words`: a text encoder for BERTScore tests."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=128).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, words: list[str]) -> Path:
    """A tiny random CLIP with a word-level tokenizer over `words` and CLIP's PIL image processor: a CLIPScore model."""
    import torch
    from transformers import BertTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in words})]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=32).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),  # [SEP] ends each text, where CLIP pools it
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=6),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


def image_bytes(colour: str, format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    colour_image(colour).save(buffer, format=format)
    return buffer.getvalue()


def shard_rows(count: int, offset: int = 0, captions: int = 2):
    """(key, colour, captions) triples whose captions are unique across all samples, so that a test can tell every
    (image, caption) pair from the captions alone."""
    names = list(COLOURS)
    return [(f"{index:06d}", names[index % len(names)],
             [f"a {names[index % len(names)]} square number {index} take {k}" for k in range(captions)])
            for index in range(offset, offset + count)]


def add_tar_member(archive, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_webdataset(root: Path, shards: int = 3, per_shard: int = 2, captions: int = 2, offset: int = 0,
                     json_captions: bool = False) -> list[Path]:
    """`root/000000.tar`, ...: webdataset shards of `{key}.jpg` with `{key}.txt` (one caption a line) or `{key}.json`
    (`{"captions": [...]}`) members."""
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = root / f"{shard:06d}.tar"
        with tarfile.open(path, "w") as archive:
            for key, colour, texts in shard_rows(per_shard, offset + shard * per_shard, captions):
                add_tar_member(archive, f"{key}.jpg", image_bytes(colour))
                if json_captions:
                    add_tar_member(archive, f"{key}.json", json.dumps({"captions": texts}).encode())
                else:
                    add_tar_member(archive, f"{key}.txt", "\n".join(texts).encode())
        paths.append(path)
    return paths


def write_parquet(path: Path, count: int = 4, offset: int = 0, captions: int = 2, image: str = "struct",
                  row_group_size: int = 3) -> Path:
    """A parquet file of `count` rows: an `image` column (datasets' `{bytes, path}` struct, or plain `binary` bytes
    in a `jpg` column), `caption_0..caption_{captions-1}` and a `key` column; several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = shard_rows(count, offset, captions)
    columns = {"key": [key for key, _, _ in rows]}
    encoded = [image_bytes(colour) for _, colour, _ in rows]
    if image == "struct":
        columns["image"] = [{"bytes": data, "path": f"{key}.jpg"} for data, (key, _, _) in zip(encoded, rows)]
    else:
        columns["jpg"] = pa.array(encoded, pa.binary())
    for k in range(captions):
        columns[f"caption_{k}"] = [texts[k] for _, _, texts in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path
