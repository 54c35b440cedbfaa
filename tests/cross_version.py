"""
A repo saved on one transformers release must load and caption identically on another: `.ci/run` saves with the
newest release and checks with the oldest declared one, and the other way round.

    python -m tests.cross_version save DIR     # tiny models of both fusions, their captions, logits and images
    python -m tests.cross_version check DIR    # load with trust_remote_code only (vision_gpt not importable), compare

`check` exits with 1 on any difference.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

MODELS = {"prefix": dict(fusion="prefix", visual_tokens="queries"),
          "cross_attention": dict(fusion="cross_attention", visual_tokens="patches"),
          # transformers' own Llama as the decoder, with Llama's special tokens (tests/conftest.py)
          "llama_prefix": dict(fusion="prefix", visual_tokens="queries", decoder="llama")}
TEXTS = ["a dog", "two cats run"]
DECODINGS = {"greedy": dict(max_new_tokens=12, num_beams=1), "beams": dict(max_new_tokens=12, num_beams=3)}


def save(root: Path) -> None:
    import torch
    import transformers

    from vision_gpt import VisionGPTProcessor

    from .conftest import decoder_tokenizer, random_images, tiny_decoder_config, tiny_model

    images = random_images(2, seed=5)
    for name, overrides in MODELS.items():
        folder = root / name
        overrides = dict(overrides)
        decoder = overrides.pop("decoder", "gpt2")
        tokenizer = decoder_tokenizer(decoder)
        text_config = tiny_decoder_config(decoder, tokenizer) if decoder != "gpt2" else None
        model = tiny_model(text_config=text_config, **overrides)
        image_processor = VisionGPTProcessor.default_image_processor(model.config.vision_config)
        processor = VisionGPTProcessor(image_processor=image_processor, tokenizer=tokenizer)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        paths = []
        for index, image in enumerate(images):
            paths.append(str(folder / f"image{index}.png"))
            image.save(paths[-1])
        inputs = processor(images=images)
        expected = {"transformers": transformers.__version__, "paths": paths}
        for decoding, settings in DECODINGS.items():
            expected[decoding] = model.generate(**inputs, **settings).tolist()
        with torch.no_grad():
            torch.save(model(**processor(images=images, suffix=TEXTS)).logits, folder / "logits.pt")
        (folder / "expected.json").write_text(json.dumps(expected))
        print(f"{name}: saved with transformers {transformers.__version__}")


def check(root: Path) -> bool:
    sys.modules["vision_gpt"] = None  # as a user without the package: only the repo's remote code
    os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp())
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    same = True
    for name in MODELS:
        folder = root / name
        expected = json.loads((folder / "expected.json").read_text())
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        if not type(model).__module__.startswith("transformers_modules."):
            raise RuntimeError(f"{name}: loaded {type(model).__module__}, not the repo's remote code")
        images = [Image.open(path) for path in expected["paths"]]
        inputs = processor(images=images)
        results = {decoding: model.generate(**inputs, **settings).tolist() == expected[decoding]
                   for decoding, settings in DECODINGS.items()}
        captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
        captions = [captioner(path, **DECODINGS["greedy"])[0]["generated_text"] for path in expected["paths"]]
        results["pipeline"] = captions == processor.batch_decode(expected["greedy"])
        with torch.no_grad():
            logits = model(**processor(images=images, suffix=TEXTS)).logits
        difference = (logits - torch.load(folder / "logits.pt")).abs().max().item()
        results["logits"] = difference < 1e-5
        print(f"{name}: saved on transformers {expected['transformers']}, loaded on {transformers.__version__}: "
              f"{results}, max |logits difference| {difference:.1e}")
        same &= all(results.values())
    return same


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "save":
        save(folder)
    elif command == "check":
        sys.exit(0 if check(folder) else 1)
    else:
        sys.exit(f"unknown command {command!r}: use save or check")
