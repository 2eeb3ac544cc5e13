"""IDX files and the splits (src/mnist_cnn/data/mnist.py): malformed data is a UserError, never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import write_idx
from mnist_cnn.cli import UserError
from mnist_cnn.data.mnist import load_split, read_idx
from mnist_cnn.files import load_tensors, save_tensors


def idx_bytes(dtype_code: int, dims: list[int], payload: bytes, zero: bytes = b"\x00\x00") -> bytes:
    return zero + bytes([dtype_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def write_split(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)


def sample_split(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 28, 28), (3, 2, 4), (12,), (1,)])
def test_write_read_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "a.idx"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == torch.uint8
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    # The exact on-disk layout: magic 0x0000080N, big-endian dims, then the bytes in C order.
    assert path.read_bytes() == idx_bytes(0x08, list(shape), array.tobytes())


def test_write_idx_leaves_no_temp_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.zeros((2, 28, 28), dtype=np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_load_split_round_trip(tmp_path: Path) -> None:
    images, labels = sample_split(9)
    write_split(tmp_path, "train", images, labels)
    got_images, got_labels = load_split(tmp_path, "train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == torch.int64


def test_load_split_test_uses_t10k_names(tmp_path: Path) -> None:
    images, labels = sample_split(4, seed=3)
    write_split(tmp_path, "t10k", images, labels)
    np.testing.assert_array_equal(load_split(tmp_path, "test")[1], labels)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte: cannot read"):
        load_split(tmp_path, "train")


def test_tensors_round_trip(tmp_path: Path) -> None:
    tensors = {"images": torch.arange(12, dtype=torch.uint8).reshape(3, 2, 2), "labels": torch.tensor([1, 2, 3])}
    save_tensors(tmp_path / "t.pt", tensors)
    back = load_tensors(tmp_path / "t.pt")
    assert back.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(back[key], tensors[key])


def test_load_tensors_missing_file_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing \(run the earlier stages first"):
        load_tensors(tmp_path / "train.pt")


# --- malformed IDX files ------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\x00\x08",
        b"\x00\x00\x08\x03\x00\x00\x00\x01",
        b"\x00\x00\x08\x01\x00\x00",
        # Wrong magic: a gzip file, the float dtype code, non-zero leading bytes.
        b"\x1f\x8b\x08\x00" + bytes(20),
        idx_bytes(0x0D, [2], b"\x00" * 8),
        idx_bytes(0x08, [2], b"\x00\x00", zero=b"\x00\x01"),
        # Wrong number of dims.
        idx_bytes(0x08, [], b""),
        idx_bytes(0x08, [1, 1, 1, 1], b"\x00"),
        # Payload size disagrees with the header.
        idx_bytes(0x08, [2, 2, 2], b"\x00" * 7),
        idx_bytes(0x08, [2, 2, 2], b"\x00" * 9),
        idx_bytes(0x08, [3], b""),
        idx_bytes(0x08, [0], b""),
    ],
    ids=[
        "empty",
        "3-bytes",
        "3d-header-cut",
        "1d-header-cut",
        "gzip",
        "float-dtype",
        "nonzero-lead",
        "0-dims",
        "4-dims",
        "short-payload",
        "long-payload",
        "no-payload",
        "no-items",
    ],
)
def test_malformed_idx_is_one_user_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        read_idx(path)
    assert str(caught.value) == f"{path}: not an IDX file of unsigned bytes, or cut short"


def test_missing_idx_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope: cannot read \(No such file or directory\)"):
        read_idx(tmp_path / "nope")


def test_idx_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot read \(Is a directory\)"):
        read_idx(tmp_path)


@pytest.mark.parametrize("dims", [[2**31, 2**31, 4], [0, 2**32 - 1, 2**32 - 1]], ids=["wraps-to-0", "zero-but-huge"])
def test_header_whose_size_overflows_is_a_user_error(tmp_path: Path, dims: list[int]) -> None:
    path = tmp_path / "huge"
    path.write_bytes(idx_bytes(0x08, dims, b""))
    with pytest.raises(UserError):
        read_idx(path)


# --- inconsistent splits ------------------------------------------------------


def test_label_above_9(tmp_path: Path) -> None:
    images, labels = sample_split(5)
    labels[3] = 10
    write_split(tmp_path, "train", images, labels)
    with pytest.raises(UserError, match=r"^train labels: values must be 0-9, found 10$"):
        load_split(tmp_path, "train")


def test_label_255(tmp_path: Path) -> None:
    images, labels = sample_split(5)
    labels[0] = 255
    write_split(tmp_path, "t10k", images, labels)
    with pytest.raises(UserError, match=r"found 255"):
        load_split(tmp_path, "test")


@pytest.mark.parametrize("image_shape", [(4, 28, 27), (4, 32, 32), (4, 1, 784), (4, 784)])
def test_image_shape_not_28x28(tmp_path: Path, image_shape: tuple[int, ...]) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(image_shape, dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(UserError, match=r"train images: expected shape \(N, 28, 28\), got "):
        load_split(tmp_path, "train")


def test_images_file_that_is_1d(tmp_path: Path) -> None:
    # A labels file where the images belong: valid IDX, wrong shape.
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(4, dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(UserError, match=r"expected shape \(N, 28, 28\), got \(4,\)"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("n_labels", [4, 6, 600])
def test_label_count_mismatch(tmp_path: Path, n_labels: int) -> None:
    images, _ = sample_split(5)
    write_split(tmp_path, "train", images, np.zeros(n_labels, dtype=np.uint8))
    with pytest.raises(UserError, match=rf"^train: 5 images but labels of shape \({n_labels},\)$"):
        load_split(tmp_path, "train")


def test_labels_file_with_3_dims(tmp_path: Path) -> None:
    images, _ = sample_split(2)
    write_split(tmp_path, "train", images, np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(UserError, match=r"2 images but labels of shape \(2, 28, 28\)"):
        load_split(tmp_path, "train")


# --- properties ---------------------------------------------------------------


def read_or_user_error(path: Path, content: bytes) -> np.ndarray | None:
    path.write_bytes(content)
    try:
        array = read_idx(path)
    except UserError:
        return None
    assert array.dtype == torch.uint8
    assert 1 <= array.ndim <= 3
    assert array.numel() == len(content) - 4 - 4 * array.ndim
    return array


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64))
def test_arbitrary_bytes_give_array_or_user_error(tmp_path: Path, content: bytes) -> None:
    read_or_user_error(tmp_path / "f", content)


# Headers that look like IDX, so the checks past the magic get exercised too. Dims stay below 2**20:
# larger ones are covered by the overflow test above.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype_code=st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0B]),
    dims=st.lists(st.integers(min_value=0, max_value=2**20 - 1) | st.integers(0, 4), max_size=4),
    payload=st.binary(max_size=80),
)
def test_idx_like_bytes_give_array_or_user_error(
    tmp_path: Path, dtype_code: int, dims: list[int], payload: bytes
) -> None:
    array = read_or_user_error(tmp_path / "f", idx_bytes(dtype_code, dims, payload))
    if array is not None:
        assert list(array.shape) == dims
        assert array.numpy().tobytes() == payload


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 6)),
        st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(tmp_path: Path, shape: tuple[int, ...], seed: int) -> None:
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    write_idx(tmp_path / "r", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "r"), array)
