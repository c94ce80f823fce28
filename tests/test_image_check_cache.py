"""Forms re-count class images on every change of a field: an unchanged file is not decoded
again (cached by path, size and modification time), a changed one is."""

from __future__ import annotations

import os

from PIL import Image

from colab_dreambooth.data import images
from colab_dreambooth.data.images import check_images


def test_unchanged_images_are_not_decoded_again(tmp_path, monkeypatch):
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    opened = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert len(check_images(tmp_path, 64)[0]) == 3 and len(opened) == 3
    assert len(check_images(tmp_path, 64)[0]) == 3 and len(opened) == 3  # from the cache
    # A file replaced by a broken one (new size and time) is checked again and reported.
    broken = tmp_path / "1.png"
    broken.write_bytes(b"not a png at all")
    os.utime(broken, ns=(1, 1))
    usable, problems = check_images(tmp_path, 64)
    assert len(usable) == 2 and len(opened) == 4
    assert any(p.path == broken for p in problems)
    # Another resolution is another question.
    check_images(tmp_path, 128)
    assert len(opened) == 7  # all three files again
