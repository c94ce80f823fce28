"""Aspect-ratio buckets: sizes, assignment without cropping the subject away, one-bucket
batches that are a pure function of (seed, epoch), prior preservation within a bucket, and a
training run on the tiny model."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.validation import validate
from colab_dreambooth.data.buckets import (
    assign_buckets,
    bucket_report,
    bucket_sizes,
    fit_to_bucket,
    nearest_bucket,
    oriented_size,
)
from colab_dreambooth.data.dataset import DreamBoothDataset, Example, TrainingData
from colab_dreambooth.data.images import to_tensor
from colab_dreambooth.data.samplers import BucketBatchSampler
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path, size, seed=0):
    torch.manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def shapes(tmp_path):
    """Instance images 2:1, 1:2 and square; class images only 2:1 and square."""
    inst, cls = tmp_path / "instance", tmp_path / "class"
    inst.mkdir()
    cls.mkdir()
    sizes = {"wide": (256, 128), "tall": (128, 256), "square": (192, 192)}
    for k, (name, size) in enumerate(sizes.items()):
        for j in range(2):
            _image(inst / f"{name}_{j}.png", size, seed=10 * k + j)
    for j in range(3):
        _image(cls / f"wide_{j}.png", (256, 128), seed=100 + j)
        _image(cls / f"square_{j}.png", (192, 192), seed=200 + j)
    return inst, cls


def test_bucket_sizes_match_kohyas_at_512():
    sizes = bucket_sizes(512)
    for expected in [(512, 512), (256, 1024), (1024, 256), (320, 768), (384, 640), (448, 576),
                     (576, 448), (640, 384), (768, 320)]:
        assert expected in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert 0.8 * 512 ** 2 <= w * h <= 512 ** 2  # about the same pixel count
    assert sizes == sorted(sizes, key=lambda s: (s[0] / s[1], s[0] * s[1]))
    assert set(bucket_sizes(512, 384, 640)) <= {s for s in sizes} | {(640, 384), (384, 640)}


def test_a_2_to_1_image_goes_to_the_2_to_1_bucket_uncropped(tmp_path):
    sizes = bucket_sizes(192)
    assert (256, 128) in sizes and (128, 256) in sizes
    assert nearest_bucket(512, 256, sizes) == (256, 128)
    assert nearest_bucket(256, 512, sizes) == (128, 256)
    assert nearest_bucket(640, 600, sizes) == (192, 192)
    image = Image.open(_image(tmp_path / "wide.png", (512, 256)))
    fitted = fit_to_bucket(image, (256, 128), center_crop=False)
    assert fitted.size == (256, 128)
    # nothing cropped: the same as resizing the whole picture
    whole = image.resize((256, 128), Image.Resampling.LANCZOS)
    assert torch.equal(to_tensor(fitted), to_tensor(whole))


def test_fitting_crops_only_the_difference_in_aspect_ratio(tmp_path):
    image = Image.open(_image(tmp_path / "wider.png", (300, 128)))
    fitted = fit_to_bucket(image, (256, 128), center_crop=True)
    assert fitted.size == (256, 128)
    # the centre 256 columns: 22 px off each side, where a square crop would lose 172
    assert torch.equal(to_tensor(fitted), to_tensor(image.crop((22, 0, 278, 128))))


def test_exif_rotation_decides_the_shape(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (256, 128), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(path, exif=exif)
    assert oriented_size(path) == (128, 256)
    assert assign_buckets([path], 192)[path] == (128, 256)


def test_batches_come_from_one_bucket_and_depend_only_on_seed_and_epoch():
    buckets = [(256, 128)] * 5 + [(192, 192)] * 4 + [(128, 256)] * 3
    sampler = BucketBatchSampler(buckets, 2, seed=4)
    assert not hasattr(sampler, "batch_size")  # accelerate then keeps each batch whole
    assert len(sampler) == 3 + 2 + 2
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(12))  # each index once
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)
        again = BucketBatchSampler(buckets, 2, seed=4)
        again.set_epoch(epoch)
        assert list(again) == batches  # no hidden state: a resumed run gets the same
        orders.append(batches)
    assert orders[0] != orders[1]
    sampler.set_epoch(1)
    sampler.skip_next(3)
    assert list(sampler) == orders[1][3:]
    assert list(sampler) == orders[1]  # the skip is for one iteration only


def test_accelerate_shards_whole_one_bucket_batches():
    from accelerate.data_loader import BatchSamplerShard

    buckets = [(256, 128)] * 5 + [(192, 192)] * 4 + [(128, 256)] * 3
    sampler = BucketBatchSampler(buckets, 2, seed=1)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=k))
              for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # 7 batches, evened out to 2 x 4
    everything = [b for shard in shards for b in shard]
    assert all(len({buckets[i] for i in b}) == 1 for b in everything)
    assert sorted(i for b in everything for i in b)[:12] != []
    assert {i for b in everything for i in b} == set(range(12))


def _data(shapes):
    inst, cls = shapes
    instance = [Example(p, "a photo of zwx toy", 0) for p in sorted(inst.glob("*.png"))]
    classes = [Example(p, "a photo of a toy", 0) for p in sorted(cls.glob("*.png"))]
    return TrainingData(instance, {0: classes})


def test_dataset_serves_each_image_at_its_bucket_and_pairs_class_images(shapes):
    data = _data(shapes)
    images = [e.image for e in data.instance] + [e.image for e in data.classes[0]]
    bucket_of = assign_buckets(images, 192)
    dataset = DreamBoothDataset(data, 192, center_crop=False, flip=False, seed=0,
                                bucket_of=bucket_of)
    wide_classes = {e.image for e in data.classes[0] if e.image.name.startswith("wide")}
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i, example in enumerate(data.instance):
            item = dataset[i]
            w, h = bucket_of[example.image]
            assert item["instance"][0].shape == (3, h, w)
            assert item["class"][0].shape == (3, h, w)  # same bucket as its instance row
            if example.image.name.startswith("wide"):
                # a class image of the 2:1 bucket itself, uncropped
                original = to_tensor(Image.open(example.image).convert("RGB"))
                assert torch.equal(item["instance"][0], original)
    # tall instance images: no tall class image, so a class image is fitted to their bucket
    tall = [i for i, e in enumerate(data.instance) if e.image.name.startswith("tall")]
    dataset.set_epoch(0)
    assert dataset[tall[0]]["class"][0].shape == (3, 256, 128)
    # wide instance images take wide class images, in turn
    wide = [i for i, e in enumerate(data.instance) if e.image.name.startswith("wide")]
    paired = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in wide:
            key = dataset[i]["class"][0]
            paired.add(next(p for p in wide_classes
                            if torch.equal(key, to_tensor(Image.open(p).convert("RGB")))))
    assert paired == wide_classes  # every wide class image is used
    # the cache holds each image at its own bucket, and the class images at the tall bucket
    entries = dataset.cache_entries()
    assert len(entries) == len(images) + len(data.classes[0])
    assert (data.classes[0][0].image, (128, 256)) in entries


def test_bucket_report_counts(shapes):
    data = _data(shapes)
    instance = [e.image for e in data.instance]
    classes = [e.image for e in data.classes[0]]
    report = bucket_report(instance, classes, assign_buckets(instance + classes, 192))
    rows = {tuple(line.split()[:3]): line.split()[-2:] for line in report.splitlines()[1:]}
    assert rows[("128", "x", "256")] == ["2", "0"]
    assert rows[("192", "x", "192")] == ["2", "3"]
    assert rows[("256", "x", "128")] == ["2", "3"]


def test_bucket_sides_are_validated(tiny_config):
    config = tiny_config.copy(enable_bucket=True, min_bucket_reso=128, max_bucket_reso=100)
    wheres = sorted(p.where for p in validate(config, DeviceInfo.cpu()))
    assert wheres == ["max_bucket_reso", "min_bucket_reso"]
    assert validate(tiny_config.copy(enable_bucket=True), DeviceInfo.cpu()) == []


@pytest.mark.parametrize("cache", [True, False])
def test_training_with_buckets(tiny_config, shapes, caplog, cache):
    inst, cls = shapes
    concept = Concept(instance_prompt="a photo of zwx toy", class_prompt="a photo of a toy",
                      instance_data_dir=str(inst), class_data_dir=str(cls), num_class_images=6)
    config = tiny_config.copy(resolution=192, enable_bucket=True, concepts_list=[concept],
                              max_train_steps=2, cache_latents=cache, train_batch_size=2)
    with caplog.at_level(logging.INFO):
        result = train(config, progress=False)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert "Aspect-ratio buckets" in caplog.text and "256 x 128" in caplog.text


def test_two_processes_train_with_buckets_in_sync(tiny_config, shapes, tmp_path):
    """accelerate hands each process whole one-bucket batches (of different shapes on each
    process at the same step); the gradients still all-reduce and the weights stay equal."""
    from test_multiprocess import launch  # pytest puts tests/ on sys.path

    from colab_dreambooth.config.params import save_params

    inst, cls = shapes
    concept = Concept(instance_prompt="a photo of zwx toy", class_prompt="a photo of a toy",
                      instance_data_dir=str(inst), class_data_dir=str(cls), num_class_images=6)
    config = tiny_config.copy(resolution=192, enable_bucket=True, concepts_list=[concept],
                              max_train_steps=3, train_batch_size=2, save_preview_every=0,
                              save_preview_every_steps=0, model_name="ddp-buckets")
    out = launch(save_params(config, tmp_path / "p.json"), tmp_path / "digests")
    assert out.stdout.count("steps=3 stopped=False") == 2
    digests = {p.read_text() for p in (tmp_path / "digests").iterdir()}
    assert len(digests) == 1


def test_stop_and_resume_with_buckets_and_shuffled_tags_is_exact(tiny_config, shapes,
                                                                  monkeypatch):
    """Bucketed batches (3 buckets, batch 2: 4 batches an epoch) and tag orders are functions
    of (seed, epoch, index): a run stopped mid-epoch and resumed ends bit-identical."""
    import threading

    from test_resume import assert_same_weights

    import colab_dreambooth.data.loader as loader_module
    from colab_dreambooth.data.dataset import collate

    inst, cls = shapes
    concept = Concept(instance_prompt="zwx toy, red, shiny, small, studio light",
                      class_prompt="a toy, red, small", instance_data_dir=str(inst),
                      class_data_dir=str(cls), num_class_images=6)

    def config(name):
        return tiny_config.copy(
            model_name=name, resolution=192, enable_bucket=True, concepts_list=[concept],
            train_batch_size=2, max_train_steps=6, shuffle_tags=True, hflip=True,
            center_crop=False, cache_latents=True, save_every_steps=0, seed=11)

    prompts = []

    def spy(items):
        batch = collate(items)
        prompts.extend(batch["prompts"])
        return batch

    monkeypatch.setattr(loader_module, "collate", spy)
    whole = train(config("whole"), progress=False)
    instance = [p for p in prompts if p.startswith("zwx toy")]
    assert len(set(instance)) > 1 and all(p.startswith("zwx toy, ") for p in instance)
    stop = threading.Event()
    first = train(config("split"), stop=stop, progress=False,
                  on_step=lambda step, loss, lr: step == 5 and stop.set())
    assert first.stopped_early and first.steps == 5
    second = train(config("split"), resume=True, progress=False)
    assert second.losses == whole.losses
    assert_same_weights(whole.model_dir, second.model_dir)
