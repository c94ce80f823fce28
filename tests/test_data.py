"""Tests for colab_dreambooth.data.dataset: collecting the training data and forming batches.

Everything runs on real files written into ``tmp_path`` (the demo's synthetic subject and class
images, plus broken files made here).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.data.dataset import (
    DataError,
    DreamBoothDataset,
    Example,
    TrainingData,
    collate,
    collect_training_data,
)
from colab_dreambooth.data.images import crop_and_resize, hflip, load_image, to_tensor
from colab_dreambooth.data.samplers import EpochBatchSampler
from colab_dreambooth.demo import demo_config, make_demo_data

RES = 64  # demo_config's resolution; the demo images are 128 px


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def demo(tmp_path):
    """Fresh demo data in ``tmp_path/data`` and its config (models_root = tmp_path)."""
    make_demo_data(tmp_path / "data")
    return tmp_path, demo_config(tmp_path)


def with_concept(config, **changes):
    """A copy of ``config`` whose first concept has ``changes``."""
    new = config.copy()
    for key, value in changes.items():
        setattr(new.concepts_list[0], key, value)
    return new


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def asymmetric_image(size: int, colour: tuple[int, int, int]) -> Image.Image:
    """Left third ``colour``, the rest grey: its mirror image is clearly different."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    image.paste(colour, (0, 0, size // 3, size))
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def captions(folder: Path) -> dict[str, str]:
    """Image file name -> the text of its .txt caption."""
    return {p.with_suffix(".png").name: p.read_text(encoding="utf-8")
            for p in sorted(folder.glob("*.txt"))}


def snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def make_concept_folder(folder: Path, prefix: str, count: int, caption: str,
                        colour: tuple[int, int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        asymmetric_image(96, colour).save(folder / f"{prefix}_{i:02d}.png")
        (folder / f"{prefix}_{i:02d}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- prompts
def test_demo_data_gives_rewritten_instance_and_plain_class_prompts(demo):
    root, config = demo
    data = collect_training_data(config)

    instance_captions = captions(root / "data" / "instance")
    class_captions = captions(root / "data" / "class")
    assert len(instance_captions) == 6 and len(class_captions) == 12

    assert [e.image.name for e in data.instance] == sorted(instance_captions)
    for example in data.instance:
        caption = instance_captions[example.image.name]
        assert caption.startswith("a photo of a toy on a ")
        # Description mode: the instance token goes before the class word, its article goes.
        assert example.prompt == caption.replace("a photo of a toy", "a photo of zwx toy")
        assert example.prompt.startswith("a photo of zwx toy on a ")
        assert example.prompt.endswith(" background")
        assert example.concept == 0
        assert example.image.parent == root / "data" / "instance"

    assert list(data.classes) == [0]
    assert [e.image.name for e in data.classes[0]] == sorted(class_captions)
    for example in data.classes[0]:
        assert example.prompt == class_captions[example.image.name]  # as it is
        assert "zwx" not in example.prompt
        assert example.concept == 0
        assert example.image.parent == root / "data" / "class"
    assert data.with_prior_preservation
    assert data.warnings == []


def test_fixed_prompts_without_filewords(demo):
    _, config = demo
    config = with_concept(config, instance_prompt="photo of zwx toy", class_prompt="photo of a toy")
    data = collect_training_data(config)
    assert {e.prompt for e in data.instance} == {"photo of zwx toy"}
    assert {e.prompt for e in data.classes[0]} == {"photo of a toy"}


def test_class_captions_need_not_give_an_instance_prompt(demo):
    """A class image's caption is only built into the class prompt: one without the class word
    (a generic regularisation caption) must not be an error about the instance token."""
    root, config = demo
    (root / "data" / "class" / "toy_03.txt").write_text("a photo of a red ball", encoding="utf-8")
    data = collect_training_data(config)
    prompts = {e.image.name: e.prompt for e in data.classes[0]}
    assert prompts["toy_03.png"] == "a photo of a red ball"
    assert len(data.classes[0]) == 12


def test_instance_caption_holding_the_token_is_not_checked_as_a_class_prompt(demo):
    """In Description mode a caption that already holds the token gives the instance prompt
    as it is; the class prompt of an instance image is never used, so it is no error."""
    root, config = demo
    (root / "data" / "instance" / "star_02.txt").write_text("a photo of zwx toy on a mat",
                                                            encoding="utf-8")
    data = collect_training_data(config)
    prompts = {e.image.name: e.prompt for e in data.instance}
    assert prompts["star_02.png"] == "a photo of zwx toy on a mat"


def test_class_image_caption_with_the_instance_token_is_an_error(demo):
    root, config = demo
    caption = root / "data" / "class" / "toy_05.txt"
    caption.write_text("a photo of zwx toy", encoding="utf-8")
    with pytest.raises(DataError) as info:
        collect_training_data(config)
    [problem] = info.value.problems
    assert str(caption) in problem
    assert "holds the Instance Token 'zwx'" in problem


# ----------------------------------------------------------------------------- problems
def test_every_problem_at_once_each_naming_its_file(demo):
    root, config = demo
    instance = root / "data" / "instance"
    empty = instance / "empty.png"
    empty.write_bytes(b"")
    truncated = instance / "cut.jpg"
    whole = jpeg_bytes(noise_image(128, 128, seed=3))
    truncated.write_bytes(whole[: len(whole) // 2])
    bad_caption = instance / "star_01.txt"
    bad_caption.write_text("a photo of a ball on a table", encoding="utf-8")

    with pytest.raises(DataError) as info:
        collect_training_data(config)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert str(info.value).startswith("3 problem(s) with the training data:")

    [p_empty] = [p for p in problems if str(empty) in p]
    assert "empty (0 bytes)" in p_empty and p_empty.startswith("concept 1 instance image")
    [p_cut] = [p for p in problems if str(truncated) in p]
    assert "truncated" in p_cut
    [p_caption] = [p for p in problems if "caption" in p and "zwx" in p]
    assert f"caption file '{bad_caption}'" in p_caption  # names the .txt, not the image
    assert "concept 1" in p_caption
    assert "a photo of a ball on a table" in p_caption
    assert "none of the Class Tokens" in p_caption
    # every problem appears in the message too
    for p in problems:
        assert p in str(info.value)


def test_upper_case_caption_file_is_named_in_the_problem(demo):
    root, config = demo
    instance = root / "data" / "instance"
    (instance / "star_04.txt").unlink()
    upper = instance / "star_04.TXT"
    upper.write_text("a picture of a ball", encoding="utf-8")
    with pytest.raises(DataError) as info:
        collect_training_data(config)
    [problem] = info.value.problems
    assert f"caption file '{upper}'" in problem


def test_image_without_caption_file_is_named_itself(demo):
    root, config = demo
    instance = root / "data" / "instance"
    noise_image(128, 128).save(instance / "ball_07.png")  # caption from the name: "ball"
    with pytest.raises(DataError) as info:
        collect_training_data(config)
    [problem] = info.value.problems
    assert f"caption file '{instance / 'ball_07.png'}'" in problem
    assert "the caption 'ball'" in problem


def test_blank_instance_folder_is_an_error_not_the_current_folder(demo, monkeypatch):
    root, config = demo
    monkeypatch.chdir(root / "data" / "instance")  # holds good images: must not be used
    with pytest.raises(DataError) as info:
        collect_training_data(with_concept(config, instance_data_dir="  "))
    [problem] = info.value.problems
    assert "concept 1" in problem and "Instance dataset directory is blank" in problem


def test_missing_instance_folder_is_named(demo):
    root, config = demo
    missing = root / "nowhere"
    with pytest.raises(DataError) as info:
        collect_training_data(with_concept(config, instance_data_dir=str(missing)))
    [problem] = info.value.problems
    assert str(missing) in problem and "does not exist" in problem


def test_instance_folder_with_home_shorthand(demo, monkeypatch):
    root, config = demo
    monkeypatch.setenv("HOME", str(root))
    data = collect_training_data(with_concept(config, instance_data_dir="~/data/instance"))
    assert [e.image for e in data.instance] == sorted((root / "data" / "instance").glob("*.png"))


def test_mislabelled_file_is_used_with_a_warning(demo):
    root, config = demo
    instance = root / "data" / "instance"
    mislabelled = instance / "star_09.jpg"
    mislabelled.write_bytes(png_bytes(asymmetric_image(128, (250, 210, 40))))
    (instance / "star_09.txt").write_text("a photo of a toy on a mat", encoding="utf-8")

    data = collect_training_data(config)
    used = {e.image: e.prompt for e in data.instance}
    assert used[mislabelled] == "a photo of zwx toy on a mat"
    assert len(data.instance) == 7
    [warning] = data.warnings
    assert str(mislabelled) in warning
    assert "contains PNG data but is named .jpg" in warning
    assert "rename it to star_09.png" in warning


# ----------------------------------------------------------------------------- class images
def test_too_few_class_images_is_a_problem_with_both_counts(demo):
    root, config = demo
    config = with_concept(config, num_class_images=20)
    with pytest.raises(DataError) as info:
        collect_training_data(config)
    [problem] = info.value.problems
    assert str(root / "data" / "class") in problem
    assert "holds 12 usable images" in problem
    assert "Total Number of Class Images is 20" in problem
    assert "missing 8" in problem


def test_too_few_class_images_is_a_warning_when_not_required(demo):
    root, config = demo
    config = with_concept(config, num_class_images=20)
    data = collect_training_data(config, require_class_images=False)
    assert len(data.instance) == 6
    assert [e.image.name for e in data.classes[0]] == [f"toy_{i:02d}.png" for i in range(12)]
    [warning] = data.warnings
    assert "holds 12 usable images" in warning and "is 20" in warning


def test_broken_class_images_do_not_count(demo):
    root, config = demo
    broken = root / "data" / "class" / "toy_00.png"
    broken.write_bytes(b"")
    with pytest.raises(DataError) as info:
        collect_training_data(config)  # wants 12, only 11 usable
    problems = info.value.problems
    assert len(problems) == 2
    assert any(str(broken) in p and p.startswith("concept 1 class image") for p in problems)
    assert any("holds 11 usable images" in p and "is 12" in p for p in problems)


def test_only_the_first_n_class_images_are_used(demo):
    _, config = demo
    data = collect_training_data(with_concept(config, num_class_images=5))
    assert [e.image.name for e in data.classes[0]] == [f"toy_{i:02d}.png" for i in range(5)]
    assert data.warnings == []


def test_num_class_images_zero_uses_the_whole_class_folder(demo):
    root, config = demo
    config = with_concept(config, num_class_images=0)
    assert config.concepts_list[0].wants_prior_preservation
    data = collect_training_data(config)
    assert [e.image for e in data.classes[0]] == sorted((root / "data" / "class").glob("*.png"))


def test_no_class_prompt_means_no_class_images(demo):
    _, config = demo
    data = collect_training_data(with_concept(config, class_prompt=""))
    assert data.classes == {}
    assert not data.with_prior_preservation
    assert len(data.instance) == 6


def test_blank_class_folder_is_the_model_classifiers_folder(demo):
    root, config = demo
    config = with_concept(config, class_data_dir="", num_class_images=4)
    expected = root / "dreambooth" / "demo-star" / "classifiers" / "concept_1"
    assert config.class_dir(0) == expected

    with pytest.raises(DataError) as info:  # not generated yet
        collect_training_data(config)
    [problem] = info.value.problems
    assert str(expected) in problem and "holds 0 usable images" in problem

    data = collect_training_data(config, require_class_images=False)
    assert data.classes[0] == []
    [warning] = data.warnings  # said once, with the count
    assert str(expected) in warning and "holds 0 usable images" in warning and "is 4" in warning
    assert not expected.exists()  # collecting never creates folders

    expected.mkdir(parents=True)
    for src in sorted((root / "data" / "class").iterdir())[:10]:  # 5 images + 5 captions
        shutil.copy(src, expected / src.name)
    data = collect_training_data(config)
    assert [e.image for e in data.classes[0]] == sorted(expected.glob("*.png"))[:4]
    assert [e.image.name for e in data.classes[0]] == [f"toy_{i:02d}.png" for i in range(4)]


# ----------------------------------------------------------------------------- datasets
@pytest.fixture
def three_concepts(demo):
    """Concept 1: the demo (class images); 2: a 'dog' subject with its own class images;
    3: a 'cat' subject without prior preservation."""
    root, config = demo
    dogs = make_concept_folder(root / "dogs", "dog", 3, "a photo of a dog number {i}", (200, 0, 0))
    dog_class = make_concept_folder(root / "dog_class", "reg", 5, "a photo of a dog, reg {i}",
                                    (0, 0, 200))
    cats = make_concept_folder(root / "cats", "cat", 2, "a photo of a cat number {i}", (0, 200, 0))
    concepts = config.concepts_list + [
        Concept(instance_prompt="[filewords]", class_prompt="[filewords]",
                instance_data_dir=str(dogs), class_data_dir=str(dog_class),
                instance_token="qwe", class_token="dog", num_class_images=5),
        Concept(instance_prompt="[filewords]", class_prompt="", instance_data_dir=str(cats),
                instance_token="ohwx", class_token="cat"),
    ]
    return root, config.copy(concepts_list=concepts)


def test_class_images_pair_only_with_their_own_concept(three_concepts):
    root, config = three_concepts
    data = collect_training_data(config)
    assert [len([e for e in data.instance if e.concept == i]) for i in range(3)] == [6, 3, 2]
    assert sorted(data.classes) == [0, 1]
    assert [e.prompt for e in data.classes[1]] == [f"a photo of a dog, reg {i}" for i in range(5)]

    class_prompts = {i: {e.prompt for e in pool} for i, pool in data.classes.items()}
    assert class_prompts[0].isdisjoint(class_prompts[1])
    token = {0: "zwx toy", 1: "qwe dog", 2: "ohwx cat"}
    dataset = DreamBoothDataset(data, RES, center_crop=False, flip=True, seed=0)
    assert len(dataset) == 11
    for _ in range(2):  # two epochs, so the class images cycle
        for i in range(len(dataset)):
            item = dataset[i]
            concept = data.instance[i].concept
            pixels, prompt, _ = item["instance"]
            assert pixels.shape == (3, RES, RES)
            assert token[concept] in prompt
            if concept == 2:
                assert item["class"] is None
            else:
                class_pixels, class_prompt, _ = item["class"]
                assert class_pixels.shape == (3, RES, RES)
                assert class_prompt in class_prompts[concept]


def test_class_pixels_come_from_the_same_concept(three_concepts):
    """Concept 2's images are red/blue, concept 1's toys are on varied backgrounds: the class
    image of every concept-2 item is concept 2's blue class image."""
    root, config = three_concepts
    data = collect_training_data(config)
    dataset = DreamBoothDataset(data, RES, center_crop=True, flip=False, seed=0)
    reg = to_tensor(crop_and_resize(load_image(root / "dog_class" / "reg_00.png"), RES, True))
    for i, example in enumerate(data.instance):
        item = dataset[i]
        if example.concept == 1:
            assert torch.equal(item["class"][0], reg)
        elif example.concept == 0:
            assert not torch.equal(item["class"][0], reg)


def test_collate_puts_instance_rows_first(three_concepts):
    _, config = three_concepts
    data = collect_training_data(config)
    dataset = DreamBoothDataset(data, RES, center_crop=True, flip=False, seed=0)
    first_dog = next(i for i, e in enumerate(data.instance) if e.concept == 1)
    first_cat = next(i for i, e in enumerate(data.instance) if e.concept == 2)
    items = [dataset[0], dataset[first_cat], dataset[first_dog]]
    batch = collate(items)

    assert batch["num_instance"] == 3
    assert batch["pixels"].shape == (5, 3, RES, RES)  # 3 instance rows + 2 class rows (no cat)
    assert batch["latent_mean"] is None and batch["latent_std"] is None
    rows = [items[0]["instance"], items[1]["instance"], items[2]["instance"],
            items[0]["class"], items[2]["class"]]
    assert batch["prompts"] == [r[1] for r in rows]
    for k, row in enumerate(rows):
        assert torch.equal(batch["pixels"][k], row[0])
    assert "zwx toy" in batch["prompts"][0]
    assert "ohwx cat" in batch["prompts"][1]
    assert "qwe dog" in batch["prompts"][2]
    assert batch["prompts"][4].startswith("a photo of a dog, reg ")


def test_collate_without_class_images(three_concepts):
    _, config = three_concepts
    data = collect_training_data(config)
    dataset = DreamBoothDataset(data, RES, center_crop=True, flip=False, seed=0)
    cats = [i for i, e in enumerate(data.instance) if e.concept == 2]
    batch = collate([dataset[i] for i in cats])
    assert batch["num_instance"] == 2 and batch["pixels"].shape == (2, 3, RES, RES)


def test_collate_cached_latents():
    mean = {k: torch.full((4, 8, 8), float(k)) for k in range(3)}
    ids = {k: torch.tensor([float(k)] * 6) for k in range(3)}
    items = [{"instance": ((mean[0], mean[0] * 0 + 0.5), "a", ids[0]),
              "class": ((mean[1], mean[1]), "b", ids[1])},
             {"instance": ((mean[2], mean[2]), "c", ids[2]), "class": None}]
    batch = collate(items)
    assert batch["pixels"] is None
    assert batch["prompts"] == ["a", "c", "b"]
    assert batch["time_ids"][:, 0].tolist() == [0.0, 2.0, 1.0]  # SDXL's size/crop, row by row
    assert batch["num_instance"] == 2
    assert batch["latent_mean"][:, 0, 0, 0].tolist() == [0.0, 2.0, 1.0]
    assert batch["latent_std"][:, 0, 0, 0].tolist() == [0.5, 2.0, 1.0]


def test_class_images_cycle_so_every_one_is_used(demo):
    """6 instance images, 12 class images: each pass over the instance images (an epoch) takes
    the next class images in turn, so no class image repeats before all 12 were used."""
    root, config = demo
    for i in range(12):
        (root / "data" / "class" / f"toy_{i:02d}.txt").write_text(f"a photo of a toy, number {i}",
                                                                  encoding="utf-8")
    data = collect_training_data(config)
    dataset = DreamBoothDataset(data, RES, center_crop=True, flip=False, seed=0)
    sampler = EpochBatchSampler(len(dataset), 2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    per_epoch = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        used = []
        for batch in loader:
            n = batch["num_instance"]
            assert n == 2 and len(batch["prompts"]) == 4
            used += batch["prompts"][n:]
        per_epoch.append(used)
    expected = {f"a photo of a toy, number {i}" for i in range(12)}
    assert all(len(set(u)) == 6 for u in per_epoch)  # no repeat within an epoch
    assert set(per_epoch[0] + per_epoch[1]) == expected  # all 12 over two epochs
    assert set(per_epoch[2] + per_epoch[3]) == expected  # and again
    counts = {p: (per_epoch[0] + per_epoch[1] + per_epoch[2] + per_epoch[3]).count(p)
              for p in expected}
    assert set(counts.values()) == {2}


def test_fewer_class_images_than_instance_images_repeat_evenly(demo):
    _, config = demo
    data = collect_training_data(with_concept(config, num_class_images=4))
    dataset = DreamBoothDataset(data, RES, center_crop=True, flip=False, seed=0)
    used = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        used += [dataset[i]["class"][0] for i in range(len(dataset))]  # 12 items
    pool = [to_tensor(crop_and_resize(load_image(e.image), RES, True)) for e in data.classes[0]]
    counts = [sum(torch.equal(u, p) for u in used) for p in pool]
    assert counts == [3, 3, 3, 3]


# ----------------------------------------------------------------------------- determinism
def items_of(dataset: DreamBoothDataset, epochs: int = 2) -> list[torch.Tensor]:
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            out.append(item["instance"][0])
            if item["class"] is not None:
                out.append(item["class"][0])
    return out


def test_same_seed_same_tensors(three_concepts):
    _, config = three_concepts
    data = collect_training_data(config)
    # Non-square images make the random crop matter too.
    a = items_of(DreamBoothDataset(data, 48, center_crop=False, flip=True, seed=123))
    b = items_of(DreamBoothDataset(data, 48, center_crop=False, flip=True, seed=123))
    c = items_of(DreamBoothDataset(data, 48, center_crop=False, flip=True, seed=124))
    assert len(a) == len(b) == len(c) == 2 * (11 + 9)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_random_crop_is_seeded(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    noise_image(200, 64, seed=1).save(folder / "wide.png")
    data = TrainingData(instance=[Example(folder / "wide.png", "p", 0)])

    def first_crop(seed: int) -> torch.Tensor:
        return DreamBoothDataset(data, 64, False, False, seed)[0]["instance"][0]

    assert torch.equal(first_crop(5), first_crop(5))
    assert first_crop(5).shape == (3, 64, 64)
    ds = DreamBoothDataset(data, 64, False, False, 5)
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        seen.add(tuple(ds[0]["instance"][0][0, 0, :4].tolist()))
    assert len(seen) > 1  # the crop moves from epoch to epoch


def test_flip_false_never_flips_and_flip_true_does(three_concepts):
    root, config = three_concepts
    data = collect_training_data(config)
    reference: dict[str, list[torch.Tensor]] = {}  # prompt -> the images that carry it
    for example in data.instance + [e for pool in data.classes.values() for e in pool]:
        pixels = to_tensor(crop_and_resize(load_image(example.image), RES, True))
        assert not torch.equal(pixels, hflip(pixels))  # every image is asymmetric
        reference.setdefault(example.prompt, []).append(pixels)

    def orientations(flip: bool) -> list[str]:
        dataset = DreamBoothDataset(data, RES, center_crop=True, flip=flip, seed=0)
        seen = []
        for epoch in range(5):
            dataset.set_epoch(epoch)
            for i in range(len(dataset)):
                item = dataset[i]
                for row in (item["instance"], item["class"]):
                    if row is None:
                        continue
                    pixels, prompt, _ = row
                    if any(torch.equal(pixels, r) for r in reference[prompt]):
                        seen.append("upright")
                    elif any(torch.equal(pixels, hflip(r)) for r in reference[prompt]):
                        seen.append("flipped")
                    else:
                        seen.append("other")
        return seen

    unflipped = orientations(False)
    assert len(unflipped) == 5 * (11 + 9) and set(unflipped) == {"upright"}
    flipped = orientations(True)
    assert "other" not in flipped
    assert 0.3 < flipped.count("flipped") / len(flipped) < 0.7


def test_all_images_lists_every_distinct_image(three_concepts):
    root, config = three_concepts
    data = collect_training_data(config)
    dataset = DreamBoothDataset(data, RES, center_crop=True, flip=False, seed=0)
    images = dataset.all_images()
    assert len(images) == len(set(images)) == 6 + 12 + 3 + 5 + 2


def test_cached_latents_are_served_by_orientation(demo):
    _, config = demo
    data = collect_training_data(config)
    dataset = DreamBoothDataset(data, RES, center_crop=True, flip=False, seed=0)
    cache = {(image, False): (torch.full((4, 8, 8), float(k)), torch.ones(4, 8, 8),
                              torch.zeros(6)) for k, image in enumerate(dataset.all_images())}
    dataset.use_latents(cache)
    item = dataset[0]
    assert torch.equal(item["instance"][0][0], cache[(data.instance[0].image, False)][0])
    assert torch.equal(item["class"][0][0], cache[(data.classes[0][0].image, False)][0])
    batch = collate([dataset[1], dataset[2]])
    assert batch["pixels"] is None and batch["latent_mean"].shape == (4, 4, 8, 8)


# ----------------------------------------------------------------------------- no writes
def test_input_files_are_never_modified(three_concepts):
    root, config = three_concepts
    instance = root / "data" / "instance"
    # Odd files too: a mislabelled one and an EXIF-rotated JPEG.
    (instance / "star_08.jpg").write_bytes(png_bytes(asymmetric_image(128, (1, 2, 3))))
    (instance / "star_08.txt").write_text("a photo of a toy", encoding="utf-8")
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image(160, 128, seed=2).save(instance / "star_07.jpg", exif=exif)
    (instance / "star_07.txt").write_text("a toy", encoding="utf-8")
    before = snapshot(root)

    data = collect_training_data(config)
    assert len(data.instance) == 6 + 2 + 3 + 2
    for flip in (False, True):
        dataset = DreamBoothDataset(data, RES, center_crop=False, flip=flip, seed=0)
        items_of(dataset)
        for image in dataset.all_images():
            dataset.pixels(image)
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True,
                                             collate_fn=collate)
        assert sum(b["num_instance"] for b in loader) == len(data.instance)

    after = snapshot(root)
    assert sorted(after) == sorted(before)  # no file added or removed
    for path, (content, mtime) in before.items():
        assert after[path][0] == content, path
        assert after[path][1] == mtime, path


def test_missing_class_folder_without_a_count(demo):
    root, config = demo
    missing = root / "reg-images"
    config = with_concept(config, class_data_dir=str(missing), num_class_images=0)
    with pytest.raises(DataError) as info:
        collect_training_data(config)
    [problem] = info.value.problems
    assert problem.startswith(f"concept 1: the class folder {missing} does not exist")
    data = collect_training_data(config, require_class_images=False)
    assert data.classes == {0: []} and len(data.instance) == 6
    [warning] = data.warnings
    assert "does not exist" in warning


def test_class_folder_of_broken_images_without_a_count(demo):
    root, config = demo
    config = with_concept(config, num_class_images=0)
    for image in (root / "data" / "class").glob("*.png"):
        image.write_bytes(b"")
    with pytest.raises(DataError) as info:
        collect_training_data(config)
    problems = info.value.problems
    assert len(problems) == 13  # each empty file, then the folder
    assert problems[-1].startswith(f"concept 1: the class folder {root / 'data' / 'class'} "
                                   "holds no usable image")


def test_items_depend_only_on_seed_epoch_and_index(three_concepts):
    """No hidden generator state: asking in another order, or again, gives the same items (what
    exact resume relies on)."""
    _, config = three_concepts
    data = collect_training_data(config)
    a = DreamBoothDataset(data, 48, center_crop=False, flip=True, seed=7)
    b = DreamBoothDataset(data, 48, center_crop=False, flip=True, seed=7)
    a.set_epoch(3)
    forward = [a[i] for i in range(len(a))]
    b.set_epoch(0)
    b[0], b[1]  # other reads first
    b.set_epoch(3)
    backward = [b[i] for i in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["instance"][0], y["instance"][0])
        assert (x["class"] is None) == (y["class"] is None)
        if x["class"] is not None:
            assert torch.equal(x["class"][0], y["class"][0])


def test_epoch_batch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochBatchSampler(10, 3, seed=1)
    assert len(sampler) == 4
    first = list(sampler)
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(i for b in second for i in b) == list(range(10))
    other = EpochBatchSampler(10, 3, seed=1)
    other.set_epoch(1)
    assert list(other) == second
    assert list(EpochBatchSampler(5, 2, seed=0, shuffle=False)) == [[0, 1], [2, 3], [4]]
