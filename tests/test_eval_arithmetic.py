"""Embedding arithmetic (SIMAT-style) on the shapes: queries built from the generator's
attributes, and a perfect score for embeddings that encode the attributes exactly -- on flat
space by addition, on the sphere and Ob(n, m) by the tangent-space move."""

import pytest
import torch

import topoclip
from topoclip.data import make_shapes
from topoclip.data.shapes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, describe
from topoclip.eval import EmbeddedSet, arithmetic_metrics, arithmetic_set

VALUES = (COLOUR_NAMES, SHAPES, SIZES, POSITIONS)
KEYS = ("colour", "shape", "size", "position")


@pytest.fixture(scope="module")
def split():
    return make_shapes(num_train=2, num_val=2, num_test=400).test


def test_queries_edit_one_attribute_and_their_answers_have_it(split):
    ds = arithmetic_set(split, max_queries=200)
    q = ds.queries
    assert len(q.image) == 200 and set(q.attribute) == {"colour", "shape", "size"}
    objects = split.attributes.all_objects()
    for k in range(0, 200, 17):
        i, attribute = int(q.image[k]), q.attribute[k]
        (o,) = objects[i]
        assert ds.captions[q.source[k]] == describe([o])
        answers = q.targets[k].nonzero().flatten().tolist()
        assert answers and i not in answers
        for j in answers:
            (a,) = objects[j]
            assert a[attribute] != o[attribute] and all(a[x] == o[x] for x in KEYS if x != attribute)
            assert ds.captions[q.edited[k]] == describe([a])


def _code(objects, block=8):
    """The attributes as one one-hot block each (Ob(8, 4) layout): an exact embedding (two
    objects: the mean of their codes, never equal to a single object's)."""
    out = torch.zeros(len(KEYS), block, dtype=torch.float64)
    for o in objects:
        for b, (key, values) in enumerate(zip(KEYS, VALUES)):
            out[b, values.index(o[key])] += 1.0 / len(objects)
    return out.flatten()


def _oracle(ds, topo):
    objects = ds.split.attributes.all_objects()
    images = torch.stack([_code(objs) for objs in objects])
    texts = torch.zeros(len(ds.captions), images.shape[1], dtype=torch.float64)
    q = ds.queries
    for k in range(len(q.image)):
        texts[q.source[k]] = images[q.image[k]]
        texts[q.edited[k]] = images[q.targets[k].nonzero()[0, 0]]
    return EmbeddedSet("oracle", topo, 1.0, topo.project(images), topo.project(texts),
                       torch.tensor(ds.caption_to_image))


@pytest.mark.parametrize("name, options", [("euclidean", {}), ("sphere", {}), ("oblique-geodesic", {"m": 4})])
def test_exact_embeddings_answer_every_query_and_the_unmoved_image_does_not(split, name, options):
    ds = arithmetic_set(split, max_queries=300)
    topo = topoclip.topology(name, dim=32, **options)
    got = arithmetic_metrics(_oracle(ds, topo), ds.queries, lam=1.0)
    assert got["r1"] == 1.0 and got["r1_colour"] == 1.0 and got["queries"] == 300
    assert got["r1_unmoved"] < 0.5  # the image alone mostly finds its look-alikes
    half = arithmetic_metrics(_oracle(ds, topo), ds.queries, lam=0.2)
    assert half["r1"] < 1.0  # too short a move stops before the answer


def test_no_answerable_query_is_a_clear_error():
    tiny = make_shapes(num_train=2, num_val=2, num_test=2).test
    with pytest.raises(ValueError, match="no query has an answer"):
        arithmetic_set(tiny)
    with pytest.raises(ValueError, match="unknown attribute 'hue'"):
        arithmetic_set(tiny, attributes=("hue",))
