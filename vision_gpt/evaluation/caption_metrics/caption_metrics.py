"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE), and optionally BERTScore, as an `evaluate`
metric.

A thin wrapper: the numbers come from `vision_gpt.evaluation.compute_caption_metrics`, `vision_gpt.evaluation.bertscore` and
`vision_gpt.evaluation.clipscore`, so every route agrees.
Load it with `evaluate.load(vision_gpt.evaluation.CAPTION_METRICS_PATH)`.
"""

import datasets
import evaluate

from vision_gpt.evaluation.metrics import compute_caption_metrics

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
@inproceedings{vedantam2015cider,
  title={{CIDEr}: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

_DESCRIPTION = """\
The caption metrics of the COCO evaluation server, computed by pycocoevalcap: captions are lowercased and tokenized by
Stanford's PTB tokenizer with punctuation removed, then scored by BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D, plus
SPICE when its Stanford CoreNLP models are installed. Scores are on the 0-100 scale captioning papers use. Needs Java.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per image; empty captions score 0.
    references (`list` of `list` of `str`): the reference captions of each image, at least one per image.
    spice (`bool` or `None`, defaults to `None`): `None` adds SPICE when its CoreNLP jars are installed and otherwise
        says why under "SPICE_skipped"; `True` requires it; `False` never runs it.
    bertscore_model (`str`, *optional*): a text encoder (folder or Hub id, e.g. "roberta-large") to add BERTScore,
        computed by the bert-score package (`pip install bert-score`).
    bertscore_layer (`int`, *optional*): its layer (default: bert-score's tuned layer for a model it knows, else the
        last).
    bertscore_idf (`bool`, defaults to `False`): weight BERTScore tokens by idf over the references.
    clipscore_model (`str`, *optional*): a CLIP model (folder or Hub id, e.g. "openai/clip-vit-base-patch32") to add
        CLIPScore and RefCLIPScore; needs `images`.
    images (`list`, *optional*): the image of each caption (PIL images or file paths), for `clipscore_model`.
    instances (`str` or `list` of `str`, *optional*): COCO-style instances files (e.g. COCO's
        `annotations/instances_val2014.json`, or the `instances_shapes.json` of a shapes corpus) to add CHAIR; needs
        `image_ids`.
    image_ids (`list`, *optional*): each caption's image, as its `file_name` or `id` in `instances`.
    objects (`list` of `list` of `str`, *optional*): instead of `instances`, the object categories each image holds;
        needs `object_categories`.
    object_categories (`list` of `str`, *optional*): every category a caption could name (COCO's names get the CHAIR
        paper's synonyms).
Returns:
    "BLEU-1" ... "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D" (0-100; CIDEr-D up to 1000), "num_images", "num_references",
    and "SPICE" or "SPICE_skipped"; with `bertscore_model`, "bertscore_precision", "bertscore_recall", "bertscore_f1"
    (0-100) and "bertscore_model" (the model, layer and settings used); with `clipscore_model`, "clipscore",
    "refclipscore" (0-100) and "clipscore_model"; always "CHAIR-i", "CHAIR-s" (0-100) and "object_mentions", None
    (with "CHAIR_skipped" saying why) without `instances` or `objects`, or where no caption names an object.
Examples:
    >>> import evaluate
    >>> from vision_gpt.evaluation import CAPTION_METRICS_PATH
    >>> caption_metrics = evaluate.load(CAPTION_METRICS_PATH)
    >>> results = caption_metrics.compute(
    ...     predictions=["a dog runs on the beach", "a cat on a sofa"],
    ...     references=[["a dog runs on the beach", "a brown dog running"], ["a cat sleeps on a red sofa"]],
    ...     spice=False,
    ... )
    >>> round(results["BLEU-1"], 1)
    83.4
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325", "https://arxiv.org/abs/1411.5726"],
        )

    def _compute(self, predictions, references, spice=None, bertscore_model=None, bertscore_layer=None,
                 bertscore_idf=False, clipscore_model=None, images=None, instances=None, image_ids=None, objects=None,
                 object_categories=None):
        predictions, references = list(predictions), [list(refs) for refs in references]
        results = compute_caption_metrics(predictions, references, spice=spice)
        results.update(_chair(predictions, instances, image_ids, objects, object_categories))
        if bertscore_model:
            from vision_gpt.evaluation.bertscore import BERTScoreSettings, compute_bertscore

            settings = BERTScoreSettings(model=bertscore_model, layer=bertscore_layer, idf=bertscore_idf,
                                         flag="bertscore_model")
            results.update(compute_bertscore(predictions, references, settings))
        if clipscore_model:
            from vision_gpt.modeling.image_loading_vision_gpt import load_image

            from vision_gpt.evaluation.clipscore import CLIPScorer, CLIPScoreSettings

            if images is None or len(images) != len(predictions):
                raise ValueError(f"clipscore_model needs `images`, one per prediction ({len(predictions)}), got "
                                 f"{'none' if images is None else len(images)}.")
            scorer = CLIPScorer(CLIPScoreSettings(model=clipscore_model, flag="clipscore_model"))
            results.update(scorer([load_image(image) for image in images], predictions, references))
        return results


def _chair(predictions, instances, image_ids, objects, object_categories) -> dict:
    from vision_gpt.data.records import CaptionedImage
    from vision_gpt.evaluation.chair import ObjectVocabulary, chair_metrics, compute_chair, load_instance_annotations

    if instances is not None and objects is not None:
        raise ValueError("Pass `instances` (with `image_ids`) or `objects` (with `object_categories`), not both.")
    keys = [str(index) for index in range(len(predictions))]
    by_key = dict(zip(keys, predictions))
    if instances is not None:
        if image_ids is None or len(image_ids) != len(predictions):
            raise ValueError(f"`instances` needs `image_ids`, one per prediction ({len(predictions)}), got "
                             f"{'none' if image_ids is None else len(image_ids)}.")
        records = [CaptionedImage(key, str(image_id), []) for key, image_id in zip(keys, image_ids)]
        return chair_metrics(by_key, records, load_instance_annotations(instances), where="`instances`")
    if objects is not None:
        if object_categories is None or len(objects) != len(predictions):
            raise ValueError("`objects` needs one list of categories per prediction and `object_categories`.")
        vocabulary = ObjectVocabulary.for_categories({"name": name} for name in object_categories)
        chair = compute_chair(by_key, dict(zip(keys, objects)), vocabulary)
        return {key: chair[key] for key in ("CHAIR-i", "CHAIR-s", "object_mentions")}
    return {"CHAIR-i": None, "CHAIR-s": None, "object_mentions": None,
            "CHAIR_skipped": "CHAIR skipped: pass `instances` and `image_ids` (or `objects` and `object_categories`)."}
