"""Dataset sources: ImageFolder and manifest enumeration, selection, image decoding, bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

from densepure_core.config import DatasetConfig
from densepure_core.data.sources import DatasetError, enumerate_records, load_image, select_records


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_imagefolder_labels_in_sorted_folder_order(tmp_path):
    root = make_folder(tmp_path / "val", classes=("zebra", "ant"))
    records, num_classes = enumerate_records(DatasetConfig(kind="imagefolder", path=str(root)))
    assert num_classes == 2
    assert [(r.image_id, r.label) for r in records[:2]] == [("ant/0.png", 0), ("ant/1.png", 1 - 1)]
    assert records[3].image_id == "zebra/0.png" and records[3].label == 1


def test_selection_every_mth_and_max(tmp_path):
    root = make_folder(tmp_path / "val", per_class=5)
    cfg = DatasetConfig(kind="imagefolder", path=str(root), every=3, start=1, max_images=2)
    records, _ = enumerate_records(cfg)
    chosen = select_records(records, cfg)
    assert [r.image_id for r in chosen] == [records[1].image_id, records[4].image_id]


def test_load_image_resizes_and_center_crops(tmp_path):
    root = make_folder(tmp_path / "val", per_class=1, size=(12, 10))
    cfg = DatasetConfig(kind="imagefolder", path=str(root), image_size=8)
    records, _ = enumerate_records(cfg)
    x = load_image(records[0], cfg)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_other_image_modes_become_rgb(tmp_path, mode):
    arr = (np.arange(64).reshape(8, 8) * 4).astype(np.uint16 if mode == "I;16" else np.uint8)
    img = Image.fromarray(arr * 256 if mode == "I;16" else arr)
    img = img.convert(mode) if mode != "I;16" else img
    (tmp_path / "c").mkdir()
    img.save(tmp_path / "c" / "x.png")
    cfg = DatasetConfig(kind="imagefolder", path=str(tmp_path))
    x = load_image(enumerate_records(cfg)[0][0], cfg)
    assert x.shape == (3, 8, 8)


def test_corrupt_and_empty_images_name_the_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.png").write_bytes(b"")
    (tmp_path / "c" / "junk.png").write_bytes(b"not an image at all")
    cfg = DatasetConfig(kind="imagefolder", path=str(tmp_path))
    records, _ = enumerate_records(cfg)
    with pytest.raises(DatasetError, match="empty.png.*empty file"):
        load_image(records[0], cfg)
    with pytest.raises(DatasetError, match="junk.png.*cannot be decoded"):
        load_image(records[1], cfg)


def test_empty_dataset_and_missing_root(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetError, match="has no images"):
        enumerate_records(DatasetConfig(kind="imagefolder", path=str(tmp_path)))
    with pytest.raises(DatasetError, match="not a directory"):
        enumerate_records(DatasetConfig(kind="imagefolder", path=str(tmp_path / "nope")))


def test_unknown_label_folder_refused_with_classes_file(tmp_path):
    root = make_folder(tmp_path / "val", classes=("a", "b", "weird"), per_class=1)
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\n")
    with pytest.raises(DatasetError, match="weird.*not in classes_file"):
        enumerate_records(DatasetConfig(kind="imagefolder", path=str(root), classes_file=str(classes)))


def test_manifest_csv_relative_uris(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("a",), per_class=2)
    (tmp_path / "m.csv").write_text("image_id,uri,label\nfirst,imgs/a/0.png,3\nsecond,imgs/a/1.png,-1\n")
    cfg = DatasetConfig(kind="manifest", path=str(tmp_path / "m.csv"))
    records, num_classes = enumerate_records(cfg)
    assert [(r.image_id, r.label) for r in records] == [("first", 3), ("second", -1)]
    assert num_classes == 4
    assert load_image(records[0], cfg).shape == (3, 10, 12)
    assert root.exists()


def test_manifest_missing_columns_and_duplicates(tmp_path):
    (tmp_path / "m.csv").write_text("id,uri\nx,y\n")
    with pytest.raises(DatasetError, match="lacks columns"):
        enumerate_records(DatasetConfig(kind="manifest", path=str(tmp_path / "m.csv")))
    (tmp_path / "d.csv").write_text("image_id,uri,label\nx,a.png,0\nx,b.png,1\n")
    with pytest.raises(DatasetError, match="repeat"):
        enumerate_records(DatasetConfig(kind="manifest", path=str(tmp_path / "d.csv")))


def test_imagefolder_on_s3(tmp_path, s3_endpoint, monkeypatch):
    """An ImageNet-layout tree in a bucket: enumerated, labelled and decoded through s3fs."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    root = make_folder(tmp_path / "val", classes=("n01", "n02"), per_class=2)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("imagenet-val")
    fs.put(str(root), "imagenet-val/val", recursive=True)
    cfg = DatasetConfig(kind="imagefolder", path="s3://imagenet-val/val", image_size=8)
    records, num_classes = enumerate_records(cfg)
    assert num_classes == 2
    assert [(r.image_id, r.label) for r in records] == [("n01/0.png", 0), ("n01/1.png", 0),
                                                        ("n02/0.png", 1), ("n02/1.png", 1)]
    assert records[0].uri == "s3://imagenet-val/val/n01/0.png"
    local = load_image(enumerate_records(DatasetConfig(kind="imagefolder", path=str(root), image_size=8))[0][0],
                       DatasetConfig(kind="imagefolder", path=str(root), image_size=8))
    assert torch.equal(load_image(records[0], cfg), local)


def test_missing_s3_objects_are_found_with_one_listing_per_prefix(s3_endpoint, monkeypatch):
    import s3fs

    from densepure_core.data.sources import ImageRecord, missing_files

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("exists-bucket")
    for key in ("a/0.png", "a/1.png", "b/0.png"):
        fs.pipe_file(f"exists-bucket/{key}", b"x")
    records = [ImageRecord(k, f"s3://exists-bucket/{k}", 0) for k in ("a/0.png", "a/1.png", "a/2.png", "b/0.png",
                                                                       "c/0.png")]
    calls = []
    original = s3fs.S3FileSystem._ls  # s3fs's sync ls() runs this coroutine

    async def counted(self, path, *args, **kw):
        calls.append(path)
        return await original(self, path, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_ls", counted)
    assert [r.image_id for r in missing_files(records)] == ["a/2.png", "c/0.png"]
    assert sorted(calls) == ["exists-bucket/a", "exists-bucket/b", "exists-bucket/c"]
