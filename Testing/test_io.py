"""Reading images and writing outputs."""
from __future__ import annotations

import os

import pytest

from carlreg.io import ImageError, atomic_output, check_outputs, read_image
from conftest import shared_data_path


def test_reads_a_dicom_series_folder():
    image = read_image(shared_data_path("totalsegmentator_examples", "example_ct_dicom"))
    assert image.GetDimension() == 3 and image.GetSize() == (512, 512, 20)
    assert image.GetSpacing()[2] == pytest.approx(2.0, abs=1e-3)


def test_unreadable_inputs_are_named(tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="cannot read moving image .*notes.nii.gz"):
        read_image(text, "moving image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="folder holds no DICOM series"):
        read_image(tmp_path / "empty")


def test_atomic_output_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("cancelled")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as temporary:
        temporary.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_outputs_given_twice_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is given twice"):
        check_outputs([tmp_path / "a.h5", tmp_path / "a.h5"], [])


def test_a_set_of_outputs_appears_whole_or_not_at_all(tmp_path):
    from carlreg.io import atomic_outputs

    with pytest.raises(RuntimeError):
        with atomic_outputs() as reserve:
            reserve(tmp_path / "transform.h5").write_text("done")
            reserve(tmp_path / "warped.nii.gz")
            raise RuntimeError("writing the warped image failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_outputs() as reserve:
        reserve(tmp_path / "transform.h5").write_text("done")
        reserve(tmp_path / "warped.nii.gz").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transform.h5", "warped.nii.gz"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "warped.nii.gz").stat().st_mode & 0o777 == 0o666 & ~umask
