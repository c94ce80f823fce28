"""Tests for colab_dreambooth.data.images, on a corpus of bad and odd images built in tmp_path."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from colab_dreambooth.data.images import (
    ImageProblem,
    check_folders,
    check_images,
    crop_and_resize,
    hflip,
    load_image,
    to_tensor,
)
from colab_dreambooth.files import IMAGE_EXTENSIONS, list_image_files

WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def close(a, b, tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def snapshot(*folders: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns)
            for f in folders for p in f.rglob("*") if p.is_file()}


def by_name(problems: list[ImageProblem]) -> dict[str, list[ImageProblem]]:
    out: dict[str, list[ImageProblem]] = {}
    for p in problems:
        out.setdefault(p.path.name, []).append(p)
    return out


# --- corpus builders -------------------------------------------------------------

@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    noise(600, 800).save(d / "good.jpg")
    noise(700, 600, 1).save(d / "UPPER.JPG")
    (d / "good.txt").write_text("a photo of sks dog")
    (d / "empty.png").write_bytes(b"")
    (d / "random.jpg").write_bytes(np.random.default_rng(1).bytes(5000))
    (d / "text.png").write_text("this is not an image\n" * 20)
    full = d / "full.jpg"
    noise(1200, 1200, 2).save(full, quality=95)
    data = full.read_bytes()
    full.unlink()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    noise(600, 600, 3).save(d / "mislabelled.jpg", format="PNG")
    Image.new("P", (600, 600)).save(d / "anim.gif")
    (d / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    (d / "iphone.jpg").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    noise(40, 40).save(d / "small.jpg")
    noise(4, 600).save(d / "tiny.png")
    (d / "notes.json").write_text("{}")
    (d / ".hidden.jpg").write_bytes(b"junk")
    (d / ".ipynb_checkpoints").mkdir()
    (d / ".ipynb_checkpoints" / "x-checkpoint.jpg").write_bytes(b"junk")
    return d


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Odd but valid images, each 64x64 unless said otherwise."""
    d = tmp_path / "odd"
    d.mkdir()
    # Palette PNG: index 0 (red) is transparent on the left, index 1 (blue) on the right.
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (32, 0, 64, 64))
    pal.save(d / "palette.png", transparency=0)
    # RGBA: transparent red left, opaque green right, half-transparent red band at the bottom.
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (32, 0, 64, 64))
    rgba.paste((255, 0, 0, 128), (0, 56, 32, 64))
    rgba.save(d / "rgba.png")
    la = Image.new("LA", (64, 64), (0, 0))
    la.paste((0, 255), (32, 0, 64, 64))
    la.save(d / "la.png")
    grad = np.zeros((64, 64), dtype=np.uint16)
    grad[:, :16], grad[:, 16:32], grad[:, 32:48], grad[:, 48:] = 0, 32768, 65535, 1000
    Image.fromarray(grad).save(d / "grey16.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)
    # 60 wide x 40 high with a red top-left corner, displayed rotated 90 degrees clockwise.
    rot = Image.new("RGB", (60, 40), (128, 128, 128))
    rot.paste(RED, (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(d / "rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (64, 64), BLUE).save(d / "image.webp", lossless=True)
    Image.new("RGB", (64, 64), GREEN).save(d / "image.bmp")
    Image.new("RGB", (64, 64), RED).save(d / "upper.JPG")
    Image.new("L", (64, 64), 200).save(d / "grey.jpeg")
    Image.new("RGB", (64, 64), RED).save(d / "multi.jpg", "MPO", save_all=True,
                                          append_images=[Image.new("RGB", (64, 64), BLUE)])
    return d


# --- check_images ----------------------------------------------------------------

def test_bad_corpus_reports_every_problem(bad_folder: Path) -> None:
    usable, problems = check_images(bad_folder, 512)
    found = by_name(problems)
    assert all(p.path.parent == bad_folder for p in problems)

    def only(name: str, severity: str, *words: str) -> None:
        assert len(found[name]) == 1, found.get(name)
        p = found[name][0]
        assert p.severity == severity, p
        for w in words:
            assert w.lower() in p.message.lower(), p

    only("empty.png", "error", "empty")
    only("random.jpg", "error", "not a readable image")
    only("text.png", "error", "not a readable image")
    only("truncated.jpg", "error", "truncated")
    only("mislabelled.jpg", "warning", "PNG", "rename", "mislabelled.png")
    only("anim.gif", "error", "convert", "PNG or JPEG")
    only("photo.heic", "error", "HEIC", "convert")
    only("iphone.jpg", "error", "HEIC", "convert")
    only("small.jpg", "error", "40x40", "512", "blurry")
    only("tiny.png", "error", "4x600", "too small")
    only("notes.json", "warning", "ignored")
    assert set(found) == {"empty.png", "random.jpg", "text.png", "truncated.jpg", "mislabelled.jpg",
                          "anim.gif", "photo.heic", "iphone.jpg", "small.jpg", "tiny.png", "notes.json"}
    assert [p.name for p in usable] == ["UPPER.JPG", "good.jpg", "mislabelled.jpg"]


def test_odd_images_pass_the_check(odd_folder: Path) -> None:
    usable, problems = check_images(odd_folder, 64)
    assert problems == []
    assert len(usable) == len(list(odd_folder.iterdir()))


@pytest.mark.parametrize("resolution, ok", [(100, True), (128, False)])
def test_min_fraction_uses_shorter_side(tmp_path: Path, resolution: int, ok: bool) -> None:
    noise(200, 50).save(tmp_path / "wide.png")
    usable, problems = check_images(tmp_path, resolution)
    assert (usable == [tmp_path / "wide.png"]) is ok
    assert check_images(tmp_path, resolution, min_fraction=0.25)[1] == []


def test_empty_folder(tmp_path: Path) -> None:
    usable, problems = check_images(tmp_path, 512)
    assert usable == []
    assert len(problems) == 1 and problems[0].path == tmp_path and problems[0].severity == "error"
    assert ".jpg" in problems[0].message and "no usable" in problems[0].message


def test_missing_folder_and_file_as_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    usable, problems = check_images(missing, 512)
    assert usable == [] and [p.path for p in problems] == [missing]
    assert "does not exist" in problems[0].message
    afile = tmp_path / "a.jpg"
    noise(600, 600).save(afile)
    usable, problems = check_images(afile, 512)
    assert usable == [] and [p.path for p in problems] == [afile] and "not a folder" in problems[0].message


def test_folder_with_only_captions(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "b.txt").write_text("caption")
    usable, problems = check_images(tmp_path, 512)
    assert usable == [] and [p.path for p in problems] == [tmp_path]
    assert ".txt" in problems[0].message and problems[0].severity == "error"


def test_folder_whose_images_are_all_bad(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    _, problems = check_images(tmp_path, 512)
    assert [p.path for p in problems] == [tmp_path / "a.png", tmp_path]
    assert "none of its 1 image files" in problems[1].message


def test_check_folders_concatenates(bad_folder: Path, odd_folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    problems = check_folders([odd_folder, bad_folder, missing], 512)
    assert problems == check_images(odd_folder, 512)[1] + check_images(bad_folder, 512)[1] \
        + check_images(missing, 512)[1]
    assert problems[-1].path == missing


def test_huge_image_is_not_a_decompression_bomb(tmp_path: Path, monkeypatch) -> None:
    noise(100, 100).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is > 2x this: normally an error
    usable, problems = check_images(tmp_path, 100)
    assert problems == [] and usable == [tmp_path / "big.png"]
    assert load_image(tmp_path / "big.png").size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_truncation_detected_even_if_pil_told_to_ignore_it(bad_folder: Path, monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _, problems = check_images(bad_folder, 512)
    assert "truncated.jpg" in by_name(problems)
    with pytest.raises(OSError):
        load_image(bad_folder / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_files_are_never_modified(bad_folder: Path, odd_folder: Path) -> None:
    before = snapshot(bad_folder, odd_folder)
    check_images(bad_folder, 512)
    check_images(odd_folder, 64)
    for path in list_image_files(bad_folder) + list_image_files(odd_folder):
        try:
            load_image(path)
        except Exception:
            pass
    assert snapshot(bad_folder, odd_folder) == before


# --- errors and listing ------------------------------------------------------------

def test_problem_formatting() -> None:
    a = ImageProblem(Path("x/a.jpg"), "is empty")
    assert str(a) == f"{Path('x/a.jpg')}: is empty"
    with pytest.raises(ValueError):
        ImageProblem(Path("x"), "m", "fatal")


def test_list_image_files(bad_folder: Path) -> None:
    names = [p.name for p in list_image_files(bad_folder)]
    assert names == sorted(names)
    assert "UPPER.JPG" in names and "good.jpg" in names
    assert not any(n.startswith(".") or n.endswith((".txt", ".gif", ".json", ".heic")) for n in names)
    assert all(Path(n).suffix.lower() in IMAGE_EXTENSIONS for n in names)


# --- load_image --------------------------------------------------------------------

def test_odd_images_load_as_rgb(odd_folder: Path) -> None:
    for path in list_image_files(odd_folder):
        im = load_image(path)
        assert im.mode == "RGB", path

    px = load_image(odd_folder / "palette.png").getpixel
    assert px((5, 5)) == WHITE and px((50, 5)) == BLUE

    px = load_image(odd_folder / "rgba.png").getpixel
    assert px((5, 5)) == WHITE and px((50, 5)) == GREEN
    assert close(px((5, 60)), (255, 127, 127), 2)  # half-transparent red over white

    px = load_image(odd_folder / "la.png").getpixel
    assert px((5, 5)) == WHITE and px((50, 5)) == (0, 0, 0)

    assert close(load_image(odd_folder / "cmyk.jpg").getpixel((32, 32)), RED, 10)
    assert load_image(odd_folder / "image.webp").getpixel((3, 3)) == BLUE
    assert load_image(odd_folder / "image.bmp").getpixel((3, 3)) == GREEN
    assert close(load_image(odd_folder / "upper.JPG").getpixel((3, 3)), RED)
    assert close(load_image(odd_folder / "grey.jpeg").getpixel((3, 3)), (200, 200, 200))
    assert close(load_image(odd_folder / "multi.jpg").getpixel((3, 3)), RED)


def test_16bit_grey_is_scaled_not_clipped(odd_folder: Path) -> None:
    with Image.open(odd_folder / "grey16.png") as raw:
        assert raw.mode in ("I;16", "I")  # really a 16-bit file
    px = load_image(odd_folder / "grey16.png").getpixel
    assert px((5, 5)) == (0, 0, 0)
    assert px((20, 5))[0] in (127, 128) and px((20, 5))[0] == px((20, 5))[1] == px((20, 5))[2]
    assert px((40, 5)) == WHITE
    assert px((60, 5)) == (4, 4, 4)  # 1000 / 257


def test_exif_orientation_is_applied(odd_folder: Path) -> None:
    with Image.open(odd_folder / "rotated.jpg") as raw:
        assert raw.size == (60, 40)
    im = load_image(odd_folder / "rotated.jpg")
    assert im.size == (40, 60)
    # Orientation 6 means "rotate 90 degrees clockwise": top-left moves to top-right.
    assert close(im.getpixel((35, 4)), RED, 30)
    assert close(im.getpixel((4, 4)), (128, 128, 128), 30)
    assert close(im.getpixel((35, 55)), (128, 128, 128), 30)


def test_load_image_errors(bad_folder: Path) -> None:
    for name in ("empty.png", "random.jpg", "text.png", "truncated.jpg"):
        with pytest.raises(Exception):
            load_image(bad_folder / name)
    assert load_image(bad_folder / "mislabelled.jpg").size == (600, 600)


# --- crop_and_resize, to_tensor, hflip -----------------------------------------------

@pytest.mark.parametrize("size", [(300, 200), (200, 300), (50, 80), (1000, 999), (128, 128)])
@pytest.mark.parametrize("center", [True, False])
def test_crop_and_resize_size(size: tuple[int, int], center: bool) -> None:
    out = crop_and_resize(noise(*size), 128, center, random.Random(0))
    assert out.size == (128, 128) and out.mode == "RGB"


def test_random_crop_is_deterministic_with_seed() -> None:
    im = noise(400, 100)
    a = crop_and_resize(im, 100, False, random.Random(42))
    b = crop_and_resize(im, 100, False, random.Random(42))
    assert a.tobytes() == b.tobytes()
    crops = {crop_and_resize(im, 100, False, random.Random(s)).tobytes() for s in range(10)}
    assert len(crops) > 1
    # Short side already equals the resolution, so a random crop is an exact window.
    windows = {im.crop((x, 0, x + 100, 100)).tobytes() for x in range(301)}
    assert crops <= windows


@pytest.mark.parametrize("horizontal", [True, False])
def test_center_crop_picks_center(horizontal: bool) -> None:
    im = Image.new("RGB", (300, 100) if horizontal else (100, 300), RED)
    im.paste(GREEN, (100, 0, 200, 100) if horizontal else (0, 100, 100, 200))
    im.paste(BLUE, (200, 0, 300, 100) if horizontal else (0, 200, 100, 300))
    out = crop_and_resize(im, 100, True)
    assert (np.asarray(out) == GREEN).all()
    out = crop_and_resize(im, 50, True)  # after a downscale too
    assert out.size == (50, 50) and close(out.getpixel((25, 25)), GREEN, 2)


def test_to_tensor_and_hflip() -> None:
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), WHITE)
    t = to_tensor(im)
    assert t.shape == (3, 2, 4) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0
    assert torch.equal(t[:, 0, 0], torch.ones(3))
    f = hflip(t)
    assert torch.equal(f[:, 0, 3], torch.ones(3)) and torch.equal(f[:, 0, 0], -torch.ones(3))
    assert torch.equal(hflip(f), t)
    assert torch.allclose(to_tensor(Image.new("RGB", (1, 1), (128, 128, 128))), torch.tensor(0.0039), atol=1e-3)
