import json

import pytest

from vision_gpt.data.records import CaptionedImage
from vision_gpt.evaluation.chair import (
    ObjectVocabulary,
    caption_hallucinations,
    chair_metrics,
    compute_chair,
    find_instance_annotations,
    load_instance_annotations,
)

SHAPES = ObjectVocabulary({"circle": (), "square": (), "triangle": (), "star": ()})


def test_chair_equals_the_hand_computed_value():
    captions = {
        "twice": "a red square and a red square",        # square named twice: one object, there
        "plural": "two squares and a star",               # squares there, the star is not
        "none": "a gray background",                      # no object word
        "wrong": "a blue circle",                         # circle is not there
        "right": "three triangles",                       # there
        "half": "a circle to the left of a triangle",     # circle there, triangle not
    }
    objects = {"twice": {"square"}, "plural": {"square", "circle"}, "none": {"star"}, "wrong": {"triangle"},
               "right": {"triangle"}, "half": {"circle"}}
    chair = compute_chair(captions, objects, SHAPES)
    # Objects per caption: {square}, {square, star}, {}, {circle}, {triangle}, {circle, triangle} = 7 mentioned;
    # hallucinated: star, circle, triangle = 3. Captions with one: plural, wrong, half = 3 of 6.
    assert chair["object_mentions"] == 7 and chair["hallucinated_mentions"] == 3
    assert chair["CHAIR-i"] == pytest.approx(100 * 3 / 7) and chair["CHAIR-s"] == pytest.approx(50.0)
    assert chair["captions_with_hallucination"] == 3 and chair["num_captions"] == 6


def test_chair_is_none_when_no_caption_names_an_object():
    chair = compute_chair({"a": "a white background", "b": "nothing here"}, {"a": {"star"}, "b": set()}, SHAPES)
    assert chair["CHAIR-i"] is None and chair["CHAIR-s"] is None and chair["object_mentions"] == 0


def test_coco_synonyms_plurals_and_phrases_map_to_their_categories():
    vocabulary = ObjectVocabulary.for_categories([{"name": name} for name in
                                                  ("person", "motorcycle", "dog", "hot dog", "teddy bear", "bear")])
    found = caption_hallucinations("two men riding motorbikes past a dog", {"person", "motorcycle"}, vocabulary)
    assert found["mentioned"] == ["dog", "motorcycle", "person"] and found["hallucinated"] == ["dog"]
    assert found["phrases"]["person"] == ["men"] and found["phrases"]["motorcycle"] == ["motorbikes"]
    # The longest phrase wins: a hot dog is not a dog, a teddy bear not a bear.
    assert [c for _, c in vocabulary.mentions("a hot dog beside a teddy bear")] == ["hot dog", "teddy bear"]
    assert [c for _, c in vocabulary.mentions("people and puppies")] == ["person", "dog"]


def test_a_category_may_bring_its_own_synonyms_but_a_word_names_one_category():
    vocabulary = ObjectVocabulary.for_categories([{"name": "mug", "synonyms": ["cup of coffee"]}])
    assert vocabulary.mentions("a cup of coffee") == [("cup of coffee", "mug")]
    with pytest.raises(ValueError, match="'ball' names two object categories"):
        ObjectVocabulary({"toy": ("ball",), "sphere": ("ball",)}).mentions("a ball")


def test_every_captioned_image_needs_its_objects():
    with pytest.raises(ValueError, match="1 captioned images have no instance annotations"):
        compute_chair({"a": "a star", "b": "a circle"}, {"a": {"star"}}, SHAPES)


def write_instances(path, images, annotations, categories=("circle", "square", "triangle", "star")):
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": name} for i, name in enumerate(images)],
        "annotations": [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(annotations)],
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(categories)],
    }))


def test_annotations_are_found_in_the_data_folder_and_matched_by_file_name(tmp_path):
    (tmp_path / "annotations").mkdir()
    write_instances(tmp_path / "annotations" / "instances_val.json", ["a.jpg", "b.jpg", "empty.jpg"],
                    [(0, 4), (0, 2), (1, 1)])
    annotations = find_instance_annotations(tmp_path)
    records = [CaptionedImage("a.jpg", str(tmp_path / "a.jpg"), ["x"]), CaptionedImage("b", str(tmp_path / "b.jpg"), []),
               CaptionedImage("empty.jpg", str(tmp_path / "empty.jpg"), [])]
    metrics = chair_metrics({"a.jpg": "a star and squares", "b": "a circle", "empty.jpg": "a triangle"}, records,
                            annotations)
    # a.jpg: star, square there; b: circle there; empty.jpg has no objects, so its triangle is hallucinated.
    assert metrics == {"CHAIR-i": 25.0, "CHAIR-s": pytest.approx(100 / 3), "object_mentions": 4}


def test_missing_or_partial_annotations_give_null_chair_with_the_reason(tmp_path):
    records = [CaptionedImage("a.jpg", "a.jpg", []), CaptionedImage("c.jpg", "c.jpg", [])]
    missing = chair_metrics({"a.jpg": "a star", "c.jpg": "a star"}, records, None, where=str(tmp_path))
    assert missing["CHAIR-i"] is None and "no COCO-style instance annotations" in missing["CHAIR_skipped"]
    assert find_instance_annotations(tmp_path) is None
    write_instances(tmp_path / "instances.json", ["a.jpg"], [(0, 4)])
    partial = chair_metrics({"a.jpg": "a star", "c.jpg": "a star"}, records, find_instance_annotations(tmp_path))
    assert partial["CHAIR-s"] is None and "1 of 2 images are not in" in partial["CHAIR_skipped"]


@pytest.mark.parametrize("content, message", [
    ("not json", "Cannot read the instance annotations"),
    (json.dumps({"images": []}), "is not a COCO-style instances file"),
    (json.dumps({"images": [{"id": 0, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 0,
                 "category_id": 9}], "categories": []}), "category_id 9, which no entry"),
])
def test_a_bad_instances_file_is_named(tmp_path, content, message):
    path = tmp_path / "instances_bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_instance_annotations(path)
    assert str(path) in str(error.value)


def test_the_coco_synonym_list_covers_the_80_categories_once_each():
    from vision_gpt.evaluation.chair import COCO_SYNONYMS_PATH

    synonyms = json.loads(COCO_SYNONYMS_PATH.read_text())
    assert len(synonyms) == 80 and all(name in words for name, words in synonyms.items())
    vocabulary = ObjectVocabulary.for_categories([{"name": name} for name in synonyms])
    assert vocabulary.mentions("a bike") == [("bike", "bicycle")]
