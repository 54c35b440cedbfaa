"""CHAIR: how often captions name objects that are not in the image (Rohrbach et al., 2018, "Object Hallucination in
Image Captioning").

For every caption, the object words it contains are mapped to annotated categories; an object a caption names that
the image's instance annotations do not hold is hallucinated. From the paper's definitions:

    CHAIR-i = |{hallucinated objects}| / |{all objects mentioned}|      (over every caption's objects)
    CHAIR-s = |{captions with a hallucinated object}| / |{all captions}|

Both are sets: a caption that names one object twice ("a red square and a red square") mentions it once. Both are
percentages, like the other caption metrics. Where no caption names an object, both are undefined and reported as
None, next to the number of object mentions (0) that says why.

The ground truth is COCO-style instance annotations (`annotations/instances_*.json` for COCO, `instances.json` in a
shapes corpus). The words that name a category are its name, the `synonyms` its category entry lists (as LVIS's do)
and, for COCO's 80 categories, the synonym lists the paper uses (`coco_object_synonyms.json`); regular plurals
("squares", "buses", "ponies") count as the category.
"""

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

COCO_SYNONYMS_PATH = Path(__file__).with_name("coco_object_synonyms.json")
# Where `find_instance_files` looks in a data folder: a shapes corpus writes the first, COCO unpacks the second.
INSTANCE_FILE_PATTERNS = ("instances*.json", "annotations/instances*.json")
_WORD = re.compile(r"[a-z]+")


def _plurals(word: str) -> set[str]:
    """Regular English plurals of `word`: "square" -> "squares", "bus" -> "buses", "pony" -> "ponies"."""
    forms = {word + "s"}
    if word.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(word + "es")
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    return forms


@dataclass(frozen=True)
class ObjectVocabulary:
    """The words and phrases that name each object category in a caption (`{category: phrases}`; each category's own
    name is always one of them). Each phrase's last word also counts in its regular plural forms."""

    synonyms: Mapping[str, tuple[str, ...]]

    def __post_init__(self):
        self._phrases  # noqa: B018 -- builds the table now, so that a word listed under two categories fails here

    @cached_property
    def _phrases(self) -> dict[tuple[str, ...], str]:
        listed: dict[tuple[str, ...], str] = {}
        for category, phrases in self.synonyms.items():
            for phrase in {category, *phrases}:
                words = tuple(_WORD.findall(phrase.lower()))
                if not words:
                    raise ValueError(f"Object category {category!r} has a synonym with no letters: {phrase!r}.")
                if listed.setdefault(words, category) != category:
                    raise ValueError(f"{' '.join(words)!r} names two object categories: {listed[words]!r} and "
                                     f"{category!r}.")
        table = dict(listed)
        for words, category in listed.items():
            for plural in _plurals(words[-1]):
                # A listed word outranks another's plural form ("glasses" the cup, not two glass objects).
                table.setdefault(words[:-1] + (plural,), category)
        return table

    @cached_property
    def _longest(self) -> int:
        return max(len(words) for words in self._phrases)

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """`(phrase, category)` for each object phrase in `caption`, in order, longest phrase first ("hot dog" is a
        hot dog, not a dog)."""
        words = _WORD.findall(caption.lower())
        found, start = [], 0
        while start < len(words):
            for length in range(min(self._longest, len(words) - start), 0, -1):
                phrase = tuple(words[start : start + length])
                if phrase in self._phrases:
                    found.append((" ".join(phrase), self._phrases[phrase]))
                    start += length
                    break
            else:
                start += 1
        return found

    @classmethod
    def for_categories(cls, categories: Iterable[Mapping]) -> "ObjectVocabulary":
        """The vocabulary for COCO-style `categories` entries (`{"name", "synonyms"?}`): each name with its own listed
        synonyms, and, for a COCO category, the paper's synonyms for it."""
        coco = json.loads(COCO_SYNONYMS_PATH.read_text(encoding="utf-8"))
        synonyms = {}
        for category in categories:
            name = category["name"]
            synonyms[name] = tuple(category.get("synonyms") or ()) + tuple(coco.get(name, ()))
        return cls(synonyms)


@dataclass(frozen=True)
class InstanceAnnotations:
    """What COCO-style instance annotations say each image holds: `objects[key]` is the set of category names in the
    image, under both its `file_name` (without folders) and its `id`; `vocabulary` names the categories."""

    objects: Mapping[str, frozenset[str]]
    vocabulary: ObjectVocabulary
    sources: tuple[str, ...]

    def objects_for(self, image_id, image=None) -> frozenset[str] | None:
        """The categories in one image, looked up by its record's image file name, then by its id; None where the
        annotations do not cover it."""
        for key in ((Path(image).name if isinstance(image, (str, Path)) else None), str(image_id),
                    Path(str(image_id)).name):
            if key is not None and key in self.objects:
                return self.objects[key]
        return None


def load_instance_annotations(paths) -> InstanceAnnotations:
    """Read one or more COCO-style instances files (`images`, `annotations`, `categories`) into `InstanceAnnotations`.
    Raises `ValueError` naming the file for a file that is not one, or for a category id no category defines."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]
    objects: dict[str, set[str]] = {}
    categories: dict[str, Mapping] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read the instance annotations {path}: {error}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in
                                                 ("images", "annotations", "categories")):
            raise ValueError(f"{path} is not a COCO-style instances file: it needs 'images', 'annotations' and "
                             "'categories' lists.")
        names = {entry["id"]: entry["name"] for entry in data["categories"]}
        categories.update({entry["name"]: entry for entry in data["categories"]})
        by_id = {}
        for image in data["images"]:
            # Listed images with no annotation hold no objects: every object a caption names there is hallucinated.
            by_id[image["id"]] = set()
            objects[Path(image["file_name"]).name] = by_id[image["id"]]
            objects[str(image["id"])] = by_id[image["id"]]
        for annotation in data["annotations"]:
            if annotation["category_id"] not in names:
                raise ValueError(f"{path}: annotation {annotation.get('id')} has category_id "
                                 f"{annotation['category_id']}, which no entry of 'categories' defines.")
            if annotation["image_id"] in by_id:
                by_id[annotation["image_id"]].add(names[annotation["category_id"]])
    return InstanceAnnotations({key: frozenset(value) for key, value in objects.items()},
                               ObjectVocabulary.for_categories(categories.values()), tuple(map(str, paths)))


def find_instance_files(data_dir) -> list[Path]:
    """The COCO-style instances files in a data folder (`instances*.json`, `annotations/instances*.json`)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return []
    return sorted({path for pattern in INSTANCE_FILE_PATTERNS for path in Path(data_dir).glob(pattern)})


def caption_hallucinations(caption: str, objects: Iterable[str], vocabulary: ObjectVocabulary) -> dict:
    """One caption against the categories its image holds: `{"mentioned": categories named, "hallucinated":
    categories named that are not there, "phrases": {category: the caption's words for it}}`."""
    objects = set(objects)
    phrases: dict[str, list[str]] = {}
    for phrase, category in vocabulary.mentions(caption):
        phrases.setdefault(category, []).append(phrase)
    return {"mentioned": sorted(phrases), "hallucinated": sorted(set(phrases) - objects), "phrases": phrases}


def compute_chair(captions: Mapping[str, str], objects: Mapping[str, Iterable[str]],
                  vocabulary: ObjectVocabulary) -> dict:
    """
    CHAIR-i and CHAIR-s (percentages) of `captions` (`{image_id: caption}`) against `objects` (`{image_id: categories
    in the image}`), with the counts behind them. Both are None where no caption names an object.

    Example:
        >>> shapes = ObjectVocabulary({"circle": (), "square": (), "triangle": (), "star": ()})
        >>> chair = compute_chair({"a": "a red star", "b": "two squares"}, {"a": {"circle"}, "b": {"square"}}, shapes)
        >>> chair["CHAIR-i"], chair["CHAIR-s"], chair["object_mentions"]
        (50.0, 50.0, 2)
    """
    missing = [image_id for image_id in captions if image_id not in objects]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no instance annotations, e.g. {missing[:3]}; CHAIR "
                         "needs every captioned image's objects.")
    mentioned = hallucinated = with_hallucination = 0
    for image_id, caption in captions.items():
        found = caption_hallucinations(caption, objects[image_id], vocabulary)
        mentioned += len(found["mentioned"])
        hallucinated += len(found["hallucinated"])
        with_hallucination += bool(found["hallucinated"])
    named = mentioned > 0
    return {
        "CHAIR-i": 100.0 * hallucinated / mentioned if named else None,
        "CHAIR-s": 100.0 * with_hallucination / len(captions) if named else None,
        "object_mentions": mentioned,
        "hallucinated_mentions": hallucinated,
        "captions_with_hallucination": with_hallucination,
        "num_captions": len(captions),
    }


def chair_metrics(predictions: Mapping[str, str], records, annotations: InstanceAnnotations | None,
                  where: str = "the data folder") -> dict:
    """The CHAIR keys every evaluation reports: `CHAIR-i`, `CHAIR-s` and `object_mentions` for `{image_id: caption}` of
    `CaptionedImage` records, the ground truth from `annotations`. Where they cannot be measured (no annotations in
    `where`, or annotations that miss some of the images) they are None and `CHAIR_skipped` says why."""
    def skipped(reason):
        return {"CHAIR-i": None, "CHAIR-s": None, "object_mentions": None, "CHAIR_skipped": reason}

    if annotations is None:
        return skipped(f"CHAIR skipped: no COCO-style instance annotations ({', '.join(INSTANCE_FILE_PATTERNS)}) in "
                       f"{where}.")
    objects, missing = {}, []
    for record in records:
        if record.image_id in predictions:
            found = annotations.objects_for(record.image_id, record.image)
            if found is None:
                missing.append(record.image_id)
            else:
                objects[record.image_id] = found
    if missing:
        return skipped(f"CHAIR skipped: {len(missing)} of {len(predictions)} images are not in "
                       f"{', '.join(annotations.sources)}, e.g. {missing[:3]}.")
    chair = compute_chair(predictions, objects, annotations.vocabulary)
    return {key: chair[key] for key in ("CHAIR-i", "CHAIR-s", "object_mentions")}


def find_instance_annotations(data_dir) -> InstanceAnnotations | None:
    """The instance annotations in a data folder (`find_instance_files`), read; None where it has none."""
    files = find_instance_files(data_dir)
    return load_instance_annotations(files) if files else None


__all__ = [
    "InstanceAnnotations",
    "ObjectVocabulary",
    "caption_hallucinations",
    "chair_metrics",
    "compute_chair",
    "find_instance_annotations",
    "find_instance_files",
    "load_instance_annotations",
]
